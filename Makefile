PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/memshare generate --model smollm2-135m --max-tokens 128 "Solve 12*13." "What is the derivative of x^3?"

test: install
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests bench

bench: install
	$(PY) -m bench.throughput
