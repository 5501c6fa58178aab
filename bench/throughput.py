"""Raw engine throughput, side by side on the same weights and prompts:

memshare vs. vLLM CPU (eager and torch.compile) vs. transformers `generate` (static batch) vs. transformers
`generate_batch` (continuous batching). Workload: the first 32 MATH-500 problems in the chat template, greedy, 256 new
tokens each with EOS ignored, float32, 2 threads; every engine in a fresh process of its own.

    python -m bench.throughput [--models smollm2-135m,qwen2.5-coder-0.5b] [--peers ...] [--out docs/bench/throughput]

Writes throughput.json and throughput.png to --out and prints a Markdown table of ratios.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tqdm import tqdm

from bench.peers import PEERS, run_peer

REFERENCE = "vllm"


def markdown(results: list[dict]) -> str:
    lines = ["| model | engine | output tok/s | memshare ÷ engine | start-up s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        ours = next((r["tokens_per_s"] for r in rows if r["engine"] == "memshare"), None)
        for r in rows:
            ratio = f"{ours / r['tokens_per_s']:.2f}×" if ours else "—"
            lines.append(f"| {model} | {r['engine']} | {r['tokens_per_s']:.1f} | {ratio} | {r['startup_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        ax.barh([r["engine"] for r in rows], [r["tokens_per_s"] for r in rows],
                color=["tab:green" if r["engine"] == "memshare" else "tab:gray" for r in rows])
        ax.set_title(f"{model}: 32 x 256 tokens, 2 threads", fontsize=9)
        ax.set_xlabel("output tokens/s")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/throughput"))
    args = parser.parse_args()
    jobs = [(m, p) for m in args.models.split(",") for p in args.peers.split(",")]
    results = []
    for model, peer in tqdm(jobs, desc="engines"):
        result = run_peer(peer, model, args.num_prompts)
        results.append({"model": model, **result})
        tqdm.write(f"{model} {peer}: {result['tokens_per_s']:.1f} tok/s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "results": results}
    (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "throughput.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
