"""Dense vs. MemShare at several thresholds on GSM8K, under a KV budget that makes the dense run preempt.

    python -m bench.sharing [--model qwen2.5-coder-0.5b] [--num-problems 64] [--kv-cache-memory 256MiB]
                            [--thresholds 0.9/0.8,0.8/0.8,0.7/0.7]

Every run gets the same problems, prompts and per-problem seeds, in one process one after another.
Writes docs/bench/sharing/<model>/results.json and kv_blocks.png and prints the Markdown table.
"""

import argparse
from pathlib import Path

from memshare import SamplingParams, ShareConfig, share_config
from memshare.eval.compare import markdown_table, run_config, save
from memshare.eval.datasets import load_problems

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "sharing"
THRESHOLDS = "0.9/0.8,0.8/0.8,0.7/0.7"  # step_threshold/block_threshold pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--num-problems", type=int, default=64)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--thresholds", default=THRESHOLDS, help="comma-separated step/block threshold pairs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    problems = load_problems("gsm8k", args.num_problems)
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=args.max_tokens)
    engine = {"kv_cache_memory": args.kv_cache_memory, "num_threads": args.num_threads, "log_stats_interval": 30}
    configs = [("dense", ShareConfig())] + [
        (f"memshare {s}/{b}", share_config("memshare", step_threshold=s, block_threshold=b))
        for s, b in (map(float, pair.split("/")) for pair in args.thresholds.split(","))]
    results = []
    for label, share in configs:
        print(f"== {label}", flush=True)
        results.append(run_config(label, args.model, share, problems, params, seed=0, **engine))
        print(markdown_table(results), flush=True)
    json_path, png_path = save(results, args.out or OUT / args.model,
                               f"{args.model}, {len(problems)} GSM8K problems, {args.kv_cache_memory} KV")
    print(f"\n{markdown_table(results)}\n\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
