"""The engine beside another CPU-bound process: the same workload alone and with one core taken.

Workload: 2 chat prompts x 128 greedy tokens (EOS ignored) on smollm2-135m, float32, as in the trial of issue 35.
Each thread setting runs in a fresh process (OpenMP reads its environment once, at load) alone and then beside a
busy-looping process; the figure is the slowdown, busy wall time over alone wall time.

    python -m bench.busy_cpu [--settings ...] [--repeats 2] [--out docs/bench/busy_cpu]

Writes busy_cpu.json and busy_cpu.png to --out and prints a Markdown table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from tqdm import tqdm

from bench.peers import run_worker
from memshare.eval.plots import new_figure, save_figure

# name -> (environment, num_threads): "before" is what the engine did until issue 35, torch's defaults.
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    "2 threads + OpenMP spin (before)": ({}, 2),
    "2 threads + OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "1 thread": ({}, 1),
    "engine default (after)": ({}, None),
}
HOG = "while True: pass"


def worker(spec: dict) -> None:
    import torch

    from memshare.engine.llm import LLM
    from memshare.sampling_params import SamplingParams

    llm = LLM(model=spec["model"], num_threads=spec["threads"], log_stats_interval=0)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    chats = [[{"role": "user", "content": q}] for q in ("What is 12*13?", "Name three prime numbers.")]
    llm.chat(chats, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up: first-call allocations
    wall, cpu = time.perf_counter(), time.process_time()
    outs = llm.chat(chats, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "threads": torch.get_num_threads()}))


def run(name: str, busy: bool, model: str, max_tokens: int) -> dict:
    env, threads = SETTINGS[name]
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if busy else None
    try:
        result = run_worker("bench.busy_cpu", {"model": model, "threads": threads, "max_tokens": max_tokens}, env)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    return {"setting": name, "busy": busy, **result}


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | threads | alone s | beside a busy process s | slowdown | CPU s ÷ wall s (busy) |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["setting"] for r in rows):
        alone = median(r["wall_s"] for r in rows if r["setting"] == name and not r["busy"])
        busy = [r for r in rows if r["setting"] == name and r["busy"]]
        busy_s = median(r["wall_s"] for r in busy)
        threads = busy[0]["threads"]
        lines.append(f"| {name} | {threads} | {alone:.2f} | {busy_s:.2f} | {busy_s / alone:.1f}× | "
                     f"{median(r['cpu_s'] / r['wall_s'] for r in busy):.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    names = list(dict.fromkeys(r["setting"] for r in rows))
    fig, ax = new_figure(size=(7, 3))
    for offset, busy, color in ((-0.2, False, "tab:gray"), (0.2, True, "tab:red")):
        walls = [median(r["wall_s"] for r in rows if r["setting"] == n and r["busy"] == busy) for n in names]
        ax.barh([i + offset for i in range(len(names))], walls, height=0.4, color=color,
                label="beside a busy process" if busy else "alone")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds, 2 x 128 tokens (lower is better)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the table gives medians")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/busy_cpu"))
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    names = [n.strip() for n in args.settings.split(",")]
    jobs = [(n, busy) for _ in range(args.repeats) for n in names for busy in (False, True)]
    rows = [run(n, busy, args.model, args.max_tokens) for n, busy in tqdm(jobs, desc="busy-cpu runs")]
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    result = {"model": args.model, "machine": machine, "date": time.strftime("%Y-%m-%d"), "runs": rows}
    (args.out / "busy_cpu.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "busy_cpu.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
