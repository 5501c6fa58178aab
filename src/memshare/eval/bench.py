"""Serving benchmark: many concurrent GSM8K requests under one KV budget, per sharing policy.

Every request is submitted at t=0 and sampled with its own seed; per policy the report holds output tokens/s,
KV blocks in use (peak and mean over engine steps), memory saved, preemptions, and TTFT / TPOT percentiles.
"""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from memshare.config import ShareConfig
from memshare.engine.llm import LLM
from memshare.eval.compare import plot_kv_blocks, write_results
from memshare.eval.datasets import Problem, chat_prompt
from memshare.eval.plots import new_figure
from memshare.eval.policies import PolicySpec, engine_for, run_matched
from memshare.outputs import RequestOutput
from memshare.sampling_params import SamplingParams

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class BenchResult:
    label: str
    share: dict[str, Any]
    num_requests: int
    output_tokens: int
    wall_time_s: float
    output_tokens_per_s: float
    kv_blocks_peak: int
    kv_blocks_mean: float
    memory_saved_mean: float
    memory_saved_peak: float
    num_preemptions: int
    affected_ratio: float
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    stats: dict[str, Any]
    kv_history: list[tuple[float, int, int, int]] = field(default_factory=list)  # (engine s, physical, logical, batch)


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}


def tpot(output: RequestOutput) -> float:
    """Mean time per output token after the first."""
    metrics = output.metrics
    num_tokens = len(output.outputs[0].token_ids)
    return (metrics["latency_s"] - metrics["time_to_first_token_s"]) / max(num_tokens - 1, 1)


def run_policy(label: str, model: str, share: ShareConfig, problems: list[Problem], params: SamplingParams,
               seed: int, use_tqdm: bool = True, **engine_kwargs: Any) -> BenchResult:
    """Submit every problem at once (seeds `seed + i`) to a fresh LLM and measure it."""
    llm = LLM(model=model, share=share, **engine_kwargs)
    prompts = [{"prompt_token_ids": chat_prompt(llm.get_tokenizer(), p)} for p in problems]
    params_list = [replace(params, seed=seed + i) for i in range(len(problems))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params_list, use_tqdm=use_tqdm)
    wall = time.perf_counter() - start
    stats = llm.stats()
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return BenchResult(label, share.to_dict(), len(problems), num_tokens, wall, num_tokens / wall,
                       stats["kv_blocks_peak"], stats["kv_blocks_mean"],
                       stats["memory_saved_mean"], stats["memory_saved_peak"], stats["num_preemptions"],
                       stats["affected_ratio"], percentiles([o.metrics["time_to_first_token_s"] for o in outputs]),
                       percentiles([tpot(o) for o in outputs]), stats, llm.kv_history())


def run_bench(model: str, specs: list[PolicySpec], problems: list[Problem], params: SamplingParams, seed: int = 0,
              use_tqdm: bool = True, **engine_kwargs: Any) -> list[BenchResult]:
    """One fresh engine per policy, in order; each is freed before the next loads."""
    def run(spec: PolicySpec, share: ShareConfig) -> BenchResult:
        # A matched spec's label names the knob value its search tried.
        label = spec.label + "".join(f" at {k}={getattr(share, k)}" for k in spec.match)
        print(f"== {label}: {len(problems)} requests, {model}", flush=True)
        return run_policy(label, model, share, problems, params, seed, use_tqdm,
                          **engine_for(model, spec, engine_kwargs))

    return run_matched(specs, run, lambda result: result.memory_saved_mean, lambda result: result.affected_ratio)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "-"


def _spread(values: dict[str, float], scale: float, digits: int) -> str:
    return " / ".join(f"{values[f'p{q}'] * scale:.{digits}f}" for q in PERCENTILES)


def markdown_table(results: list[BenchResult]) -> str:
    """One row per policy; × columns are ratios against the first policy."""
    base = results[0]
    rows = ["| policy | output tok/s | × | peak KV blocks | × | mean KV blocks | × | memory saved (mean / peak) | "
            "KV bytes saved vs float32 / bfloat16 | preemptions | TTFT p50 / p90 / p99 (s) | × p50 | "
            "TPOT p50 / p90 / p99 (ms) | × p50 | affected ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r.label} | {r.output_tokens_per_s:.1f} | {_ratio(r.output_tokens_per_s, base.output_tokens_per_s)} "
            f"| {r.kv_blocks_peak} | {_ratio(r.kv_blocks_peak, base.kv_blocks_peak)} | {r.kv_blocks_mean:.1f} | "
            f"{_ratio(r.kv_blocks_mean, base.kv_blocks_mean)} | {r.memory_saved_mean:.1%} / {r.memory_saved_peak:.1%} "
            f"| {r.stats['kv_bytes_saved_vs_float32']:.1%} / {r.stats['kv_bytes_saved_vs_bfloat16']:.1%} "
            f"| {r.num_preemptions} | {_spread(r.ttft_s, 1, 2)} | {_ratio(r.ttft_s['p50'], base.ttft_s['p50'])} | "
            f"{_spread(r.tpot_s, 1000, 0)} | {_ratio(r.tpot_s['p50'], base.tpot_s['p50'])} | {r.affected_ratio:.1%} |")
    return "\n".join(rows)


def bench_figure(results: list[BenchResult], title: str) -> Figure:
    """Physical KV blocks in use over engine time, per policy."""
    fig, ax = new_figure(size=(8, 4.5))
    plot_kv_blocks(ax, results, title)
    return fig


def save(results: list[BenchResult], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write bench.json and bench_kv_blocks.png (`bench_figure`)."""
    return write_results(results, out_dir / "bench.json", bench_figure(results, title),
                         out_dir / "bench_kv_blocks.png")
