"""Load test of `memshare serve` on loopback: concurrent streaming clients, some leaving early, some malformed.

    python -m bench.serve_load [--model smollm2-135m] [--num-clients 64] [--share memshare] [--max-tokens 128]

Starts the server, sends GSM8K chat requests from `--num-clients` concurrent streaming clients: 10% disconnect
after a few chunks, 10% send bad requests. Afterwards it checks every good request finished with the text an
offline `LLM.chat` gives for the same greedy request, every bad one got a 4xx, and /metrics shows no KV block in
use. Writes results.json and latency.png under --out and prints requests/s with TTFT/TPOT percentiles, and the
output tokens/s of the offline engine on the good requests for comparison. Exits 1 if any check fails.
"""

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from memshare import LLM, SamplingParams  # noqa: E402
from memshare.eval.datasets import load_problems  # noqa: E402

BAD_BODIES = [
    b"{not json",
    json.dumps({"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(),
    json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    json.dumps({"model": "{model}", "messages": "hi"}).encode(),
    json.dumps({"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "temperature": "x"}).encode(),
    json.dumps({"model": "{model}", "messages": [{"role": "user", "content": "hi " * 20000}]}).encode(),
]


def start_server(serve_args: list[str], log_path: Path | None = None,
                 timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`memshare serve` on a free loopback port, once /health answers; returns the process and its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child process writes it
    proc = subprocess.Popen([sys.executable, "-m", "memshare.entrypoints.cli", "serve", "--port", str(port),
                             *serve_args], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    details = log_path.read_text() if log_path else ""
    raise RuntimeError(f"memshare serve exited or did not answer /health within {timeout:.0f} s\n{details}")


async def good_client(client: httpx.AsyncClient, body: dict, leave_after: int | None) -> dict:
    start, first, chunks, text, usage, reason = time.perf_counter(), None, 0, "", None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter()
                text += choice["delta"].get("content") or ""
                reason = choice["finish_reason"] or reason
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return {"kind": "disconnect", "status": response.status_code}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {"kind": "good", "status": response.status_code, "text": text, "finish_reason": reason, "tokens": tokens,
            "ttft": first - start if first else None, "latency": end - start,
            "tpot": (end - first) / (tokens - 1) if first and tokens > 1 else None}


async def bad_client(client: httpx.AsyncClient, body: bytes) -> dict:
    response = await client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    return {"kind": "bad", "status": response.status_code, "error": response.json().get("error", {}).get("message")}


async def run_clients(base: str, args: argparse.Namespace, messages: list[list[dict]]) -> tuple[list[dict], float]:
    jobs = []
    for i, conversation in enumerate(messages):
        body = {"model": args.model, "messages": conversation, "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if i % 10 == 3:
            jobs.append(("bad", BAD_BODIES[(i // 10) % len(BAD_BODIES)].replace(b"{model}", args.model.encode())))
        else:
            jobs.append(("good", body, 4 if i % 10 == 7 else None))
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600)) as client:
        results = await asyncio.gather(*[bad_client(client, job[1]) if job[0] == "bad" else
                                         good_client(client, job[1], job[2]) for job in jobs])
    return list(results), time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--share", default="memshare")
    parser.add_argument("--num-clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--out", type=Path, default=Path("results/serve_load"))
    args = parser.parse_args()
    problems = load_problems("gsm8k", args.num_clients)
    messages = [[{"role": "user", "content": p.question}] for p in problems]
    proc, base = start_server(["--model", args.model, "--kv-cache-memory", args.kv_cache_memory, "--share", args.share,
                               "--max-request-bytes", "65536"])
    try:
        results, elapsed = asyncio.run(run_clients(base, args, messages))
        time.sleep(0.5)  # aborts are applied at the engine's next step
        metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{base}/metrics").text.splitlines()
                   if line and not line.startswith("#")}
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)

    good_indices = [i for i, r in enumerate(results) if r["kind"] == "good"]
    llm = LLM(model=args.model, kv_cache_memory=args.kv_cache_memory, log_stats_interval=0)
    offline_start = time.perf_counter()
    reference = llm.chat([messages[i] for i in good_indices], SamplingParams(temperature=0, max_tokens=args.max_tokens),
                         use_tqdm=True)
    offline_s = time.perf_counter() - offline_start
    good = [results[i] for i in good_indices]
    mismatches = [i for i, r, ref in zip(good_indices, good, reference) if r["text"] != ref.outputs[0].text]
    bad = [r for r in results if r["kind"] == "bad"]
    summary = {
        "model": args.model, "share": args.share, "num_clients": args.num_clients, "max_tokens": args.max_tokens,
        "kv_cache_memory": args.kv_cache_memory, "elapsed_s": elapsed,
        "good": len(good), "disconnected": sum(r["kind"] == "disconnect" for r in results), "bad": len(bad),
        "good_correct": len(good) - len(mismatches), "mismatched_requests": mismatches,
        "bad_statuses": sorted({r["status"] for r in bad}), "all_bad_4xx": all(400 <= r["status"] < 500 for r in bad),
        "requests_per_s": len(good) / elapsed, "output_tokens_per_s": sum(r["tokens"] for r in good) / elapsed,
        # The same good requests through the offline LLM in this process, all queued at once: the engine alone.
        "offline_output_tokens_per_s": sum(len(r.outputs[0].token_ids) for r in reference) / offline_s,
        "ttft_s": percentiles([r["ttft"] for r in good if r["ttft"] is not None]),
        "tpot_s": percentiles([r["tpot"] for r in good if r["tpot"] is not None]),
        "kv_blocks_used_after": metrics["memshare_kv_blocks_used"],
        "requests_aborted": metrics["memshare_request_aborted_total"],
        "blocks_shared": metrics["memshare_blocks_shared_total"],
        "preemptions": metrics["memshare_num_preemptions_total"], "server_exit_code": exit_code,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "requests": results}, indent=1))
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    panels = ((axes[0], "ttft", "time to first token (s)"), (axes[1], "tpot", "time per output token (s)"))
    for axis, key, label in panels:
        axis.hist([r[key] for r in good if r[key] is not None], bins=20)
        axis.set_xlabel(label)
        axis.set_ylabel("requests")
    figure.suptitle(f"memshare serve, {args.model}, {args.num_clients} concurrent streaming clients")
    figure.tight_layout()
    figure.savefig(args.out / "latency.png", dpi=120)
    print(json.dumps(summary, indent=1))
    ok = (not mismatches and summary["all_bad_4xx"] and summary["kv_blocks_used_after"] == 0 and exit_code == 0
          and all(r["finish_reason"] in ("stop", "length") for r in good))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
