"""Soak test of one `memshare serve` process on loopback: memory stays flat, streaming stays linear.

    python -m bench.serve_soak [--model smollm2-135m] [--num-requests 5000] [--concurrency 16] [--long-tokens 4096]

1. Sends `--num-requests` short completions (`--max-tokens` each, half streamed, every 50th client leaves after its
   first chunk) from `--concurrency` clients, reading the server's resident memory (VmRSS) every 100 requests.
   Passes when RSS after the last request is within `--rss-tolerance-mb` of RSS after the first 500, and /metrics
   shows zero KV blocks in use at the end.
2. Asks for one `--long-tokens` completion (ignore_eos) without streaming and then the same one streamed,
   `--long-repeats` times alternately, measuring the server's CPU time (utime + stime) for each. Passes when the
   streamed one costs at most 10% more CPU and returns the same text.

Writes results.json and rss.png under --out; exits 1 if a check fails.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx2 as httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.serve_load import start_server  # noqa: E402
from memshare.eval.datasets import load_problems  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(base: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{base}/metrics").text.splitlines()
            if line and not line.startswith("#")}


async def completion(client: httpx.AsyncClient, body: dict, leave_early: bool = False) -> tuple[str, str | None]:
    """The completion's text and finish reason (None for a client that left)."""
    if not body.get("stream"):
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    text, reason = "", None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text, reason = text + choice["text"], choice["finish_reason"] or reason
            if leave_early:
                return text, None
    return text, reason


async def soak(base: str, pid: int, args: argparse.Namespace, prompts: list[str]) -> tuple[list[tuple], dict]:
    samples: list[tuple[int, float]] = [(0, rss_mb(pid))]
    counts = {"finished": 0, "left": 0, "failed": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.num_requests):
        queue.put_nowait(i)
    bar = tqdm(total=args.num_requests, desc="soak requests", dynamic_ncols=True)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": args.model, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                    "temperature": 0.7, "seed": i, "stream": i % 2 == 1}
            try:
                _, reason = await completion(client, body, leave_early=i % 50 == 1)
                counts["left" if reason is None else "finished"] += 1
            except httpx.HTTPError:
                counts["failed"] += 1
            bar.update(1)
            done = sum(counts.values())
            if done % 100 == 0:
                samples.append((done, rss_mb(pid)))

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    bar.close()
    return samples, counts


async def long_completion(base: str, pid: int, args: argparse.Namespace, stream: bool) -> dict:
    body = {"model": args.model, "prompt": "Solve step by step: what is 17 * 23 + 5?", "max_tokens": args.long_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        start_cpu, start = cpu_s(pid), time.perf_counter()
        text, reason = await completion(client, body)
        return {"stream": stream, "server_cpu_s": cpu_s(pid) - start_cpu, "wall_s": time.perf_counter() - start,
                "chars": len(text), "finish_reason": reason, "text": text}


def plot(samples: list[tuple[int, float]], out: Path, title: str) -> Path:
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([s[0] for s in samples], [s[1] for s in samples], marker=".")
    axis.set_xlabel("requests completed")
    axis.set_ylabel("server RSS (MB)")
    axis.set_title(title)
    figure.tight_layout()
    path = out / "rss.png"
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--share", default="memshare")
    parser.add_argument("--step-threshold", default="0.5")
    parser.add_argument("--block-threshold", default="0.5")
    parser.add_argument("--num-requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=4096)
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--rss-tolerance-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=Path("results/serve_soak"))
    args = parser.parse_args()
    prompts = [p.question for p in load_problems("gsm8k", 200)]
    args.out.mkdir(parents=True, exist_ok=True)
    proc, base = start_server(["--model", args.model, "--kv-cache-memory", args.kv_cache_memory, "--share", args.share,
                               "--step-threshold", args.step_threshold, "--block-threshold", args.block_threshold,
                               "--max-request-bytes", "65536", "--max-tokens-limit", str(args.long_tokens)],
                              args.out / "server.log")
    try:
        start = time.perf_counter()
        samples, counts = asyncio.run(soak(base, proc.pid, args, prompts))
        soak_s = time.perf_counter() - start
        time.sleep(0.5)  # aborts are applied at the engine's next step
        after_soak = metrics(base)
        long_runs = [asyncio.run(long_completion(base, proc.pid, args, stream))
                     for _ in range(args.long_repeats) for stream in (False, True)]
        final = metrics(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)

    rss_first = next(mb for done, mb in samples if done >= min(500, args.num_requests))
    plain = sum(r["server_cpu_s"] for r in long_runs if not r["stream"])
    streamed = sum(r["server_cpu_s"] for r in long_runs if r["stream"])
    summary = {
        "model": args.model, "share": args.share, "num_requests": args.num_requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "soak_s": soak_s, "requests_per_s": args.num_requests / soak_s, **counts,
        "rss_start_mb": samples[0][1], "rss_after_500_mb": rss_first, "rss_end_mb": samples[-1][1],
        "rss_growth_mb": samples[-1][1] - rss_first, "kv_blocks_used_after_soak": after_soak["memshare_kv_blocks_used"],
        "kv_blocks_used_at_end": final["memshare_kv_blocks_used"],
        "blocks_shared": final["memshare_blocks_shared_total"],
        "requests_aborted": final["memshare_request_aborted_total"],
        "long_tokens": args.long_tokens, "long_plain_cpu_s": plain, "long_stream_cpu_s": streamed,
        "stream_cpu_ratio": streamed / plain, "stream_text_equal": len({r["text"] for r in long_runs}) == 1,
        "server_exit_code": exit_code,
    }
    checks = {"rss_flat": summary["rss_growth_mb"] <= args.rss_tolerance_mb,
              "no_blocks_in_use": summary["kv_blocks_used_at_end"] == 0 == summary["kv_blocks_used_after_soak"],
              "no_failures": counts["failed"] == 0, "stream_cpu_within_10pct": summary["stream_cpu_ratio"] <= 1.10,
              "stream_text_equal": summary["stream_text_equal"], "clean_exit": exit_code == 0}
    for run in long_runs:
        run.pop("text")
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "checks": checks, "rss": samples,
                                                       "long": long_runs}, indent=1))
    plot(samples, args.out, f"memshare serve, {args.model}: RSS over {args.num_requests} requests")
    print(json.dumps({**summary, "checks": checks}, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
