"""Run the same problems under several sharing configurations and compare accuracy, memory and speed."""

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from memshare.config import ShareConfig
from memshare.engine.llm import LLM
from memshare.engine.stats import saved_fraction
from memshare.eval.datasets import Problem, chat_prompt
from memshare.eval.grading import is_correct
from memshare.eval.plots import (
    PERCENT_SPAN,
    capacity_lines,
    count_axis,
    min_span,
    new_figure,
    percent_axis,
    save_figure,
    series_styles,
)
from memshare.sampling_params import SamplingParams


@dataclass(slots=True)
class RunResult:
    label: str
    share: dict[str, Any]
    num_problems: int
    num_correct: int
    accuracy: float
    generation_tokens: int
    wall_time_s: float
    tokens_per_s: float
    stats: dict[str, Any]
    kv_history: list[tuple[float, int, int, int]] = field(default_factory=list)  # (engine s, physical, logical, batch)
    outputs: list[dict[str, Any]] = field(default_factory=list)


def run_config(label: str, model: str, share: ShareConfig, problems: list[Problem], params: SamplingParams,
               seed: int | None = 0, **engine_kwargs: Any) -> RunResult:
    """Generate for every problem in one batch (per-problem seeds `seed + i`), grade, and collect stats."""
    llm = LLM(model=model, share=share, **engine_kwargs)
    prompts = [{"prompt_token_ids": chat_prompt(llm.get_tokenizer(), p)} for p in problems]
    params_list = [replace(params, seed=None if seed is None else seed + i) for i in range(len(problems))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params_list, use_tqdm=True)
    wall = time.perf_counter() - start
    stats = llm.stats()
    graded = [{"problem_id": p.problem_id, "answer": p.answer, "output": o.outputs[0].text,
               "num_tokens": len(o.outputs[0].token_ids), "correct": is_correct(o.outputs[0].text, p.answer)}
              for p, o in zip(problems, outputs)]
    num_correct = sum(g["correct"] for g in graded)
    return RunResult(label, share.to_dict(), len(problems), num_correct, num_correct / len(problems),
                     stats["generation_tokens"], wall, stats["generation_tokens"] / wall, stats,
                     llm.kv_history(), graded)


def markdown_table(results: list[RunResult]) -> str:
    """Side-by-side table; ratios are against the first run (the dense baseline)."""
    base = results[0]
    rows = ["| run | accuracy | generated tokens | tok/s | × dense | peak KV blocks | preemptions | memory saved "
            "(peak / mean) | affected ratio | blocks shared | sharing time |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.stats
        rows.append(f"| {r.label} | {r.accuracy:.1%} ({r.num_correct}/{r.num_problems}) | {r.generation_tokens} | "
                    f"{r.tokens_per_s:.1f} | {r.tokens_per_s / base.tokens_per_s:.2f} | {s['kv_blocks_peak']} | "
                    f"{s['num_preemptions']} | {s['memory_saved_peak']:.1%} / {s['memory_saved_mean']:.1%} | "
                    f"{s['affected_ratio']:.1%} | {s['blocks_shared']} | {s['sharing_time_share']:.2%} |")
    return "\n".join(rows)


def plot_kv_blocks(ax: Axes, results: Sequence[Any], title: str) -> None:
    """Physical KV blocks in use over engine time, one line per result (anything with label, share, stats and
    kv_history: RunResult, BenchResult) in its policy's colour, and each KV capacity as a labelled line."""
    styles = series_styles(((r.label, r.share["policy"]) for r in results), markers=False)
    for r in results:
        ax.plot([h[0] for h in r.kv_history], [h[1] for h in r.kv_history], label=r.label, linewidth=1,
                **styles[r.label])
    capacity_lines(ax, [(r.stats["num_kv_blocks"], r.stats.get("kv_cache_dtype", "auto")) for r in results])
    ax.set(xlabel="engine time (s)", ylabel="physical KV blocks in use", title=title)
    count_axis(ax.yaxis)
    ax.legend(fontsize=8)


def compare_figure(results: list[RunResult], title: str) -> Figure:
    """Physical KV blocks in use and memory saved over engine time, per run."""
    fig, axes = new_figure(1, 2, (12, 4.2))
    blocks_ax, saved_ax = axes[0]
    plot_kv_blocks(blocks_ax, results, title)
    styles = series_styles(((r.label, r.share["policy"]) for r in results), markers=False)
    for r in results:
        saved_ax.plot([h[0] for h in r.kv_history], [saved_fraction(h[1], h[2]) for h in r.kv_history],
                      label=r.label, linewidth=1, **styles[r.label])
    saved_ax.set(xlabel="engine time (s)", ylabel="memory saved (1 - physical / logical)",
                 title="memory saved by sharing")
    percent_axis(saved_ax.yaxis)
    min_span(saved_ax, "y", PERCENT_SPAN, (0, 1))
    saved_ax.legend(fontsize=8)
    return fig


def write_results(results: list, json_path: Path, figure: Figure, png_path: Path) -> tuple[Path, Path]:
    """Write `results` (dataclasses) as JSON and `figure` as a PNG beside it."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    save_figure(figure, png_path)
    return json_path, png_path


def save(results: list[RunResult], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write results.json and kv_blocks.png (`compare_figure`)."""
    return write_results(results, out_dir / "results.json", compare_figure(results, title), out_dir / "kv_blocks.png")
