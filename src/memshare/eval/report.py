"""Scores of `memshare eval` runs and `memshare report`: a Markdown table per dataset plus accuracy/memory plots."""

import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from memshare.config import policy_names, registration
from memshare.eval.plots import (
    PERCENT_SPAN,
    capacity_lines,
    count_axis,
    kl_axis,
    min_span,
    new_figure,
    percent_axis,
    save_figure,
    series_styles,
)
from memshare.eval.policies import MATCH_TOLERANCE

COLUMNS = ("policy", "parameters", "pass@1 ± CI", "Δ vs dense (paired)", "matched MemShare − this (paired)",
           "N problems", "memory saved (mean / peak)",
           "affected ratio", "tokens/s", "mean output length", "hit max_tokens", "preemptions")


def safe_name(text: str) -> str:
    return re.sub(r"[^\w.=+-]+", "_", text).strip("_")


def knobs(policy: str) -> tuple[str, ...]:
    """The registered knobs of a policy; none for a policy this process does not know (a saved run's)."""
    return registration(policy).knobs if policy in policy_names() else ()


def parameters(share: dict[str, Any]) -> dict[str, Any]:
    """The config fields (as a dict) worth showing for a run: its policy's knobs and all off-default fields."""
    if share["policy"] not in policy_names():
        return {name: value for name, value in share.items() if name != "policy"}
    # JSON round trips so that tuples and lists, as saved and as configured, compare equal.
    share = json.loads(json.dumps(share))
    defaults = json.loads(json.dumps(registration(share["policy"]).config().to_dict()))
    # A saved field the policy no longer has (runs saved before policies had configs of their own) is left out.
    return {name: value for name, value in share.items()
            if name in defaults and name != "policy" and (name in knobs(share["policy"]) or value != defaults[name])}


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a run's JSONL and their size in bytes; a last line without its newline (a killed writer's)
    is left out."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    *complete, rest = data.split(b"\n")
    return [json.loads(line) for line in complete], len(data) - len(rest)


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """pass@1 = mean over problems of correct samples / samples, with a 95% normal CI: 1.96 * sample std of the
    per-problem pass rates / sqrt(N) (0 for one problem), its bounds clipped to [0, 1]. Also the mean output length,
    the share of samples cut at max_tokens (a sign of looping) and the affected ratio (affected / generated KV blocks
    summed over the records)."""
    passes = [sum(s["correct"] for s in r["samples"]) / len(r["samples"]) for r in records]
    n = len(passes)
    mean = sum(passes) / n if n else 0.0
    ci = 1.96 * statistics.stdev(passes) / math.sqrt(n) if n > 1 else 0.0
    samples = [s for r in records for s in r["samples"]]
    lengths = [s["num_tokens"] for s in samples]
    generated = sum(r["kv_blocks_generated"] for r in records)
    return {"num_problems": n, "pass@1": mean, "ci95": ci, "ci_low": max(mean - ci, 0.0),
            "ci_high": min(mean + ci, 1.0), "mean_output_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
            "truncated": sum(s["finish_reason"] == "length" for s in samples) / len(samples) if samples else 0.0,
            "affected_ratio": sum(r["kv_blocks_affected"] for r in records) / generated if generated else 0.0}


def problem_passes(records: list[dict[str, Any]]) -> dict[str, float]:
    return {r["problem_id"]: sum(s["correct"] for s in r["samples"]) / len(r["samples"]) for r in records}


def paired_delta(passes: dict[str, float], dense: dict[str, float]) -> tuple[float, float, int]:
    """Mean per-problem pass@1 difference to dense over the problems both ran, its 95% CI, and that count.

    Same problems and seeds on both sides: a problem the policy leaves unchanged differs by 0, so the paired CI is
    much tighter than the two runs' own CIs.
    """
    diffs = [passes[k] - dense[k] for k in passes.keys() & dense.keys()]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    return mean, 1.96 * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0, n


def load_runs(directory: Path) -> list[dict[str, Any]]:
    """Every run under `directory` (recursively): its config, score from the JSONL, and summary if written."""
    runs = []
    for config_path in sorted(Path(directory).rglob("*.config.json")):
        stem = config_path.name.removesuffix(".config.json")
        config = json.loads(config_path.read_text())
        if config.get("kind") == "replay" or is_try(config):
            continue
        summary_path = config_path.with_name(f"{stem}.summary.json")
        records = read_records(config_path.with_name(f"{stem}.jsonl"))[0]
        runs.append({"name": config["run"], "policy": config["share"]["policy"], "config": config,
                     "dataset": config["dataset"]["name"], "score": score(records), "passes": problem_passes(records),
                     "summary": json.loads(summary_path.read_text()) if summary_path.exists() else {}})
    return runs


def is_try(config: dict[str, Any]) -> bool:
    """A config of one try of a matched run's search (harness `run_to_match`): not a run of its own."""
    return "trial_of" in (config.get("matched") or {})


def match_figures(run: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
    """A matched run's measured memory saved and that of its MemShare run (None for an unmatched run or one not
    measured yet)."""
    matched = run["config"].get("matched")
    if not matched or not run["summary"]:
        return None
    source = by_name.get(matched["memshare_run"], {}).get("summary") or {}
    target = source.get("memory_saved_mean", matched.get("memshare_memory_saved"))
    return None if target is None else (run["summary"]["memory_saved_mean"], target)


def not_matched_text(run: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> str | None:
    """`NOT matched: 0.0% vs 1.9% memory saved; why` where a matched run's measured memory saved is more than
    MATCH_TOLERANCE from its MemShare run's; None otherwise."""
    figures = match_figures(run, by_name)
    if figures is None or abs(figures[0] - figures[1]) <= MATCH_TOLERANCE:
        return None
    why = run["config"]["matched"].get("not_matched")
    return f"NOT matched: {figures[0]:.1%} vs {figures[1]:.1%} memory saved" + (f"; {why}" if why else "")


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _knobs_text(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in knobs.items())


def _parameters_text(run: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> str:
    text = _knobs_text(parameters(run["config"]["share"]))
    matched = run["config"].get("matched")
    if not matched:
        return text or "–"
    figures, off = match_figures(run, by_name), not_matched_text(run, by_name)
    if off:
        return f"{text} (vs {matched['memshare_run']}: {off})"
    measured = f": {figures[0]:.1%} vs {figures[1]:.1%} memory saved" if figures else ", not measured yet"
    return f"{text} (matched to {matched['memshare_run']}{measured})"


def _delta_text(run: dict[str, Any] | None, reference: dict[str, Any] | None) -> str:
    if run is None or reference is None or run is reference:
        return "–"
    mean, ci, n = paired_delta(run["passes"], reference["passes"])
    return f"{mean:+.1%} ± {ci:.1%}" if n else "–"


def _versus_matched_text(run: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> str:
    matched = run["config"].get("matched")
    # Positive when MemShare solves more of the problems both ran than the policy matched to it.
    delta = _delta_text(by_name.get(matched["memshare_run"]) if matched else None, run)
    return delta + " (not at matched memory)" if not_matched_text(run, by_name) and delta != "–" else delta


def _row(run: dict[str, Any], dense: dict[str, Any] | None, by_name: dict[str, dict[str, Any]]) -> str:
    s, summary = run["score"], run["summary"]
    total = run["config"]["dataset"]["num_problems"]
    n = f"{s['num_problems']}" + ("" if s["num_problems"] == total else f" of {total}")
    engine = ["–"] * 3
    if summary:
        engine = [f"{summary['memory_saved_mean']:.1%} / {summary['memory_saved_peak']:.1%}",
                  f"{summary['generation_tokens_per_s']:.1f}", str(summary["num_preemptions"])]
    cells = [run["policy"], _parameters_text(run, by_name), f"{s['pass@1']:.1%} ± {s['ci95']:.1%}",
             _delta_text(run, dense), _versus_matched_text(run, by_name), n, engine[0],
             f"{s['affected_ratio']:.1%}", engine[1], f"{s['mean_output_tokens']:.0f}", f"{s['truncated']:.1%}",
             engine[2]]
    return "| " + " | ".join(cells) + " |"


def _order(run: dict[str, Any]) -> tuple[int, str]:
    names = policy_names()
    return names.index(run["policy"]) if run["policy"] in names else len(names), run["name"]


def _errorbars(runs: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    scores = [r["score"] for r in runs]
    y = [s["pass@1"] for s in scores]
    return y, [[s["pass@1"] - s["ci_low"] for s in scores], [s["ci_high"] - s["pass@1"] for s in scores]]


def kv_dtype(run: dict[str, Any]) -> str:
    return run["config"].get("engine", {}).get("kv_cache_dtype", "auto")


def series_name(run: dict[str, Any]) -> str:
    """The plot series a run belongs to: its policy plus the off-default knobs that are not swept (e.g. stage1),
    and its KV dtype unless `auto`."""
    fixed = {k: v for k, v in parameters(run["config"]["share"]).items() if k not in knobs(run["policy"])}
    dtype = "" if kv_dtype(run) == "auto" else f" [{kv_dtype(run)}]"
    return run["policy"] + (f" ({_knobs_text(fixed)})" if fixed else "") + dtype


def group_series(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(series_name(run), []).append(run)
    return groups


def _styles(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return series_styles((series_name(r), r["policy"]) for r in runs)


def accuracy_vs_memory_figure(title: str, runs: list[dict[str, Any]]) -> Figure:
    """The Pareto view: pass@1 (95% CI) against mean memory saved, one series per `series_name`."""
    fig, ax = new_figure(size=(9, 4.6))
    runs = [r for r in runs if r["summary"]]
    styles = _styles(runs)
    for name, group in group_series(runs).items():
        group = sorted(group, key=lambda r: r["summary"]["memory_saved_mean"])
        x = [r["summary"]["memory_saved_mean"] for r in group]
        y, yerr = _errorbars(group)
        ax.errorbar(x, y, yerr=yerr, capsize=3, label=name, **styles[name])
        for r, xi, yi in zip(group, x, y):
            swept = {k: v for k, v in parameters(r["config"]["share"]).items() if k in knobs(r["policy"])}
            if swept:
                ax.annotate(_knobs_text(swept), (xi, yi), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="memory saved (mean of 1 - physical / logical KV blocks)", ylabel="pass@1 (95% CI)",
           title=f"{title}: accuracy vs. KV memory saved")
    percent_axis(ax.xaxis)
    percent_axis(ax.yaxis)
    min_span(ax, "x", PERCENT_SPAN, (0, 1))
    min_span(ax, "y", 2 * PERCENT_SPAN, (0, 1))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_accuracy_vs_memory(title: str, runs: list[dict[str, Any]], path: Path) -> list[str]:
    """Save `accuracy_vs_memory_figure` to `path`; returns the legend."""
    save_figure(accuracy_vs_memory_figure(title, runs), path)
    return list(group_series([r for r in runs if r["summary"]]))


def threshold_sweep_figure(title: str, runs: list[dict[str, Any]]) -> Figure:
    """pass@1 (95% CI, solid) and affected ratio (dashed, hollow markers) of MemShare runs against
    block_threshold, one marker per `series_name`."""
    fig, ax = new_figure(size=(6.4, 4.4))
    styles = _styles(runs)
    for name, group in group_series(runs).items():
        group = sorted(group, key=lambda r: r["config"]["share"]["block_threshold"])
        x = [r["config"]["share"]["block_threshold"] for r in group]
        y, yerr = _errorbars(group)
        style = {"color": styles[name]["color"], "marker": styles[name]["marker"]}
        ax.errorbar(x, y, yerr=yerr, capsize=3, label=f"{name}: pass@1", **style)
        ax.plot(x, [r["score"]["affected_ratio"] for r in group], linestyle="--", markerfacecolor="none",
                label=f"{name}: affected ratio", **style)
    ax.set(xlabel="block_threshold", ylabel="pass@1 (95% CI) / affected ratio",
           title=f"{title}: MemShare block-threshold sweep")
    percent_axis(ax.yaxis)
    min_span(ax, "x", 0.1)
    min_span(ax, "y", 2 * PERCENT_SPAN, (0, 1))
    ax.legend(fontsize=7)
    return fig


def plot_threshold_sweep(title: str, runs: list[dict[str, Any]], path: Path) -> list[str]:
    """Save `threshold_sweep_figure` to `path`; returns the legend."""
    save_figure(threshold_sweep_figure(title, runs), path)
    return [f"{name}: {what}" for name in group_series(runs) for what in ("pass@1", "affected ratio")]


def _section(directory: Path, dataset: str, runs: list[dict[str, Any]]) -> str:
    models = ", ".join(sorted({r["config"]["model"] for r in runs}))
    dense = {r["config"]["model"]: r for r in runs if r["policy"] == "none"}
    by_name = {r["name"]: r for r in runs}
    lines = [f"## {dataset}", "", f"model: {models}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS), *(_row(r, dense.get(r["config"]["model"]), by_name) for r in runs), ""]
    pareto = f"{safe_name(dataset)}_accuracy_vs_memory.png"
    plot_accuracy_vs_memory(dataset, runs, directory / pareto)
    lines.append(f"![accuracy vs. memory saved]({pareto})")
    memshare = [r for r in runs if r["policy"] == "memshare"]
    if len(memshare) >= 2:
        sweep = f"{safe_name(dataset)}_threshold_sweep.png"
        plot_threshold_sweep(dataset, memshare, directory / sweep)
        lines.append(f"![MemShare threshold sweep]({sweep})")
    return "\n".join(lines)


def load_replay_runs(directory: Path) -> list[dict[str, Any]]:
    """Every `memshare replay` run under `directory` that has a summary: its config and summary."""
    runs = []
    for config_path in sorted(Path(directory).rglob("*.config.json")):
        config = json.loads(config_path.read_text())
        summary_path = config_path.with_name(config_path.name.replace(".config.json", ".summary.json"))
        if config.get("kind") == "replay" and not is_try(config) and summary_path.exists():
            runs.append({"name": config["run"], "policy": config["share"]["policy"], "config": config,
                         "summary": json.loads(summary_path.read_text())})
    return runs


REPLAY_COLUMNS = ("policy", "parameters", "KV dtype", "traces", "output tok/s", "× dense", "wall s",
                  "batch mean / peak", "engine steps", "preemptions", "recomputed tokens", "KV blocks mean / peak",
                  "memory saved mean / peak", "KV bytes saved vs float32 / bfloat16", "affected ratio",
                  "KL(dense ‖ policy)", "top-1", "sharing time")


def bytes_saved(summary: dict[str, Any], against: str = "float32") -> float:
    """Mean KV bytes saved against the dense KV stored in `against`; runs saved before KV dtypes existed held
    float32 blocks, so their block count is their bytes."""
    key = f"kv_bytes_saved_vs_{against}"
    if key in summary:
        return summary[key]
    return summary["memory_saved_mean"] if against == "float32" else 2 * summary["memory_saved_mean"] - 1


def _optional(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _replay_row(run: dict[str, Any], dense: dict[str, Any] | None, by_name: dict[str, dict[str, Any]]) -> str:
    s, total = run["summary"], run["config"]["traces"]["num_traces"]
    traces = f"{s['num_traces']}" + ("" if s["num_traces"] == total else f" of {total}")
    if len(s["sessions"]) > 1:
        traces += f" ({len(s['sessions'])} sessions)"  # a resumed run's tok/s is not one batch's
    ratio = s["output_tokens_per_s"] / dense["summary"]["output_tokens_per_s"] if dense else None
    cells = [run["policy"], _parameters_text(run, by_name), kv_dtype(run), traces, f"{s['output_tokens_per_s']:.1f}",
             _optional(ratio, ".2f"), f"{s['wall_time_s']:.0f}",
             f"{s['num_running_mean']:.1f} / {s['num_running_peak']}", str(s.get("num_steps", "–")),
             str(s["num_preemptions"]),
             str(s["num_recomputed_tokens"]), f"{s['kv_blocks_mean']:.0f} / {s['kv_blocks_peak']}",
             f"{s['memory_saved_mean']:.1%} / {s['memory_saved_peak']:.1%}",
             f"{bytes_saved(s):.1%} / {bytes_saved(s, 'bfloat16'):.1%}", f"{s['affected_ratio']:.1%}",
             _optional(s["kl"], ".4f"), _optional(s["top1"], ".1%"), f"{s['sharing_time_share']:.2%}"]
    return "| " + " | ".join(cells) + " |"


CPU_SHARE_TRUSTED = 0.8  # a run that got less of its threads' CPU time ran beside another process
THREADS_TOLERANCE = 0.1


def load_warning(runs: list[dict[str, Any]]) -> str | None:
    """Why the tok/s ratios of `runs` cannot be trusted, if they cannot: a run got too little of its threads' CPU time,
    or the runs ran with different thread counts (the engine lowers its threads while other processes are busy)."""
    use = [(r["name"], r["summary"].get("cpu_share"), r["summary"].get("num_threads_mean")) for r in runs]
    starved = [f"{name} got {share:.0%}" for name, share, _ in use if share is not None and share < CPU_SHARE_TRUSTED]
    threads = [t for _, _, t in use if t]
    uneven = bool(threads) and max(threads) > (1 + THREADS_TOLERANCE) * min(threads)
    if not starved and not uneven:
        return None
    why = [f"{', '.join(starved)} of its threads' CPU time"] if starved else []
    if uneven:
        why.append("the runs had " + ", ".join(f"{name} {t:.1f}" for name, _, t in use if t) + " threads on average")
    return (f"**The tok/s ratios cannot be trusted: another process was using the CPU ({'; '.join(why)}).** Engine "
            "steps, batch, preemptions and memory saved do not depend on it; rerun on an idle machine for tok/s.")


def kl_crossings(runs: list[dict[str, Any]], level: float) -> dict[str, str]:
    """Per plot series, where its mean KL first reaches `level` along KV bytes saved (linearly interpolated)."""
    result = {}
    saved = "of float32's KV bytes saved"
    for name, group in group_series([r for r in runs if r["summary"]["kl"] is not None]).items():
        points = sorted((bytes_saved(r["summary"]), r["summary"]["kl"]) for r in group)
        above = next((i for i, (_, kl) in enumerate(points) if kl >= level), None)
        if above is None:
            result[name] = f"stays below {level} up to {points[-1][0]:.1%} {saved}"
        elif above == 0:
            result[name] = f"already {points[0][1]:.3f} at {points[0][0]:.1%} {saved} (its least)"
        else:
            (x0, y0), (x1, y1) = points[above - 1], points[above]
            x = x0 + (level - y0) * (x1 - x0) / (y1 - y0)
            result[name] = f"crosses {level} at about {x:.1%} {saved} (between {x0:.1%} and {x1:.1%})"
    return result


def front(points: list[tuple[float, float, str]], lower_is_better: bool) -> list[tuple[float, float, str]]:
    """The (memory saved, value, run) points no other point beats at equal or more memory saved: the best value
    at each memory level."""
    sign = 1 if lower_is_better else -1
    best: list[tuple[float, float, str]] = []
    for point in sorted(points, key=lambda p: (-p[0], sign * p[1])):
        if not best or sign * point[1] < sign * best[-1][1]:
            best.append(point)
    return best[::-1]


def replay_levels(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Non-dense runs grouped by MemShare level: each MemShare run with the baselines matched to it, then the rest."""
    levels: dict[str, list[dict[str, Any]]] = {r["name"]: [r] for r in runs if r["policy"] == "memshare"}
    for run in runs:
        source = run["config"].get("matched", {}).get("memshare_run")
        if source in levels:
            levels[source].append(run)
        elif run["policy"] not in ("none", "memshare"):
            levels.setdefault("unmatched", []).append(run)
    return levels or {"dense": []}


def _kl_throughput_figure(title: str, runs: list[dict[str, Any]], dense: dict[str, Any] | None,
                          styles: dict[str, dict[str, Any]]) -> Figure:
    fig, axes = new_figure(1, 2, (13, 4.8))
    kl_ax, speed_ax = axes[0]
    base = dense["summary"]["output_tokens_per_s"] if dense else None
    scored = [r for r in runs if r["summary"]["kl"] is not None]
    for name, group in group_series(scored).items():
        group = sorted(group, key=lambda r: bytes_saved(r["summary"]))
        x = [bytes_saved(r["summary"]) for r in group]
        kl_ax.plot(x, [r["summary"]["kl"] for r in group], label=name, **styles[name])
        if base:
            speed_ax.plot(x, [r["summary"]["output_tokens_per_s"] / base for r in group], label=name, **styles[name])
    fronts = [(kl_ax, front([(bytes_saved(r["summary"]), r["summary"]["kl"], r["name"]) for r in scored], True),
               "front: lowest KL at each memory level")]
    if base:
        fronts.append((speed_ax, front([(bytes_saved(r["summary"]), r["summary"]["output_tokens_per_s"] / base,
                                         r["name"]) for r in scored], False), "front: fastest at each memory level"))
    for ax, points, label in fronts:
        if len(points) > 1:  # a step through one point draws nothing, so it gets no legend entry either
            ax.step([p[0] for p in points], [p[1] for p in points], where="pre", color="black", linewidth=2,
                    alpha=0.35, label=label)
    kl_ax.axhline(0.05, color="grey", linestyle=":", label="KL 0.05")
    kl_axis(kl_ax, [r["summary"]["kl"] for r in scored] + [0.05])
    xlabel = "KV bytes saved vs. dense float32 (mean over steps)"
    kl_ax.set(xlabel=xlabel, ylabel="mean KL(dense || policy) per token, nats", title="fidelity vs. memory")
    speed_ax.axhline(1.0, color="grey", linestyle=":", label="dense")
    speed_ax.set(xlabel=xlabel, ylabel="output tok/s ÷ dense (same tokens)", title="throughput vs. memory")
    min_span(speed_ax, "y", 0.2)
    for ax in (kl_ax, speed_ax):
        percent_axis(ax.xaxis)
        min_span(ax, "x", PERCENT_SPAN, (0, 1))
        ax.legend(fontsize=7)
        # bfloat16 holds half of float32's bytes: saved vs bfloat16 = 2 * saved vs float32 - 1.
        top = ax.secondary_xaxis("top", functions=(lambda x: 2 * x - 1, lambda x: (x + 1) / 2))
        top.set_xlabel("KV bytes saved vs. dense bfloat16", fontsize=8)
        percent_axis(top.xaxis)
    fig.suptitle(title)  # one title over both panels: each panel's own would be cut off at this width
    return fig


def _batch_kv_figure(title: str, runs: list[dict[str, Any]], dense: dict[str, Any] | None,
                     styles: dict[str, dict[str, Any]]) -> Figure:
    levels = replay_levels(runs)
    fig, axes = new_figure(len(levels), 2, (13, 3.6 * len(levels)))
    for (level, members), (batch_ax, blocks_ax) in zip(levels.items(), axes):
        shown = ([dense] if dense else []) + members
        repeats, seen = Counter(series_name(r) for r in shown), Counter[str]()
        for run in shown:
            name = series_name(run)
            line = {"color": styles[name]["color"], "linestyle": styles[name]["linestyle"], "linewidth": 1}
            label = name
            if repeats[name] > 1:  # runs of one series (a sweep): its style, fading, and the swept knobs named
                swept = {k: v for k, v in parameters(run["config"]["share"]).items() if k in knobs(run["policy"])}
                label, line["alpha"] = f"{name}: {_knobs_text(swept)}", 1 - 0.6 * seen[name] / (repeats[name] - 1)
                seen[name] += 1
            history = run["summary"]["sessions"][-1]["kv_history"]
            times = [h[0] for h in history]
            batch_ax.plot(times, [h[3] for h in history], label=label, **line)
            blocks_ax.plot(times, [h[1] for h in history], **line)
        capacity_lines(blocks_ax, [(r["summary"]["sessions"][-1]["num_kv_blocks"], kv_dtype(r)) for r in shown])
        batch_ax.set(xlabel="engine time (s)", ylabel="running sequences")
        blocks_ax.set(xlabel="engine time (s)", ylabel="physical KV blocks in use")
        for ax, what in ((batch_ax, "batch"), (blocks_ax, "KV blocks")):
            ax.set_title(f"{level}: {what}", fontsize=8)
            count_axis(ax.yaxis)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: running batch and KV blocks, dense and each MemShare level with its matched baselines")
    return fig


def replay_figures(title: str, runs: list[dict[str, Any]], dense: dict[str, Any] | None) -> dict[str, Figure]:
    """`kl_throughput_vs_memory`: KL and tok/s ratio against KV bytes saved (one line per series); `batch_kv`:
    running batch and KV blocks over engine time (one line per run); a series has one style in both."""
    styles = _styles(([dense] if dense else []) + runs)
    return {"kl_throughput_vs_memory": _kl_throughput_figure(title, runs, dense, styles),
            "batch_kv": _batch_kv_figure(title, runs, dense, styles)}


def plot_replay(title: str, runs: list[dict[str, Any]], dense: dict[str, Any] | None, directory: Path,
                stem: str) -> list[str]:
    """Save `replay_figures` as `<stem>_<figure>.png` under `directory`; returns the PNG names."""
    names = []
    for suffix, fig in replay_figures(title, runs, dense).items():
        names.append(f"{stem}_{suffix}.png")
        save_figure(fig, directory / names[-1])
    return names


def _replay_section(directory: Path, runs: list[dict[str, Any]]) -> str:
    first = runs[0]["config"]
    traces, model = first["traces"], first["model"]
    dense = next((r for r in runs if r["policy"] == "none" and kv_dtype(r) == "auto"), None)
    by_name = {r["name"]: r for r in runs}
    stem = safe_name(f"{traces['name']}_{model}")
    title = f"{model}, {traces['name']}"
    blocks = runs[0]["summary"]["sessions"][0]["num_kv_blocks"]
    lines = [f"## replay: {traces['name']} on {model}", "",
             f"{traces['num_traces']} traces, responses cut at {traces['max_tokens']} tokens "
             f"({traces['forced_tokens']} forced tokens), all submitted at once into {blocks} KV blocks of "
             f"{first['engine']['block_size']} tokens. Every policy produces the same tokens, so × dense is a "
             "like-for-like throughput ratio. KL: over the dense run's top-"
             f"{first['top_k']} plus one bucket for the rest (a lower bound of the full KL).", "",
             "| " + " | ".join(REPLAY_COLUMNS) + " |", "|" + "---|" * len(REPLAY_COLUMNS),
             *(_replay_row(r, dense, by_name) for r in runs), ""]
    if (warning := load_warning(runs)) is not None:
        lines += [warning, ""]
    mismatched = [r["name"] for r in runs if not r["summary"]["tokens_match"]]
    if mismatched:
        lines += [f"**Output differs from the forced tokens in: {', '.join(mismatched)}**", ""]
    off = {series_name(r): f"{r['name']}: {text}" for r in runs if (text := not_matched_text(r, by_name))}
    # A series' KL at some memory saved says nothing of MemShare's level when the run missed that level.
    lines += [f"- {name}: KL {text}" + (f"; {off[name]}" if name in off else "")
              for name, text in kl_crossings(runs, 0.05).items()]
    scored = [(bytes_saved(r["summary"]), r["summary"]["kl"], r["name"]) for r in runs
              if r["summary"]["kl"] is not None]
    if scored:
        lines += ["", "The front, the lowest KL at each level of KV bytes saved vs. dense float32: "
                  + "; ".join(f"{name} ({saved:.1%}, KL {kl:.4f})" for saved, kl, name in front(scored, True)) + "."]
    names = plot_replay(title, runs, dense, directory, stem)
    lines += ["", *(f"![{n}]({n})" for n in names)]
    return "\n".join(lines)


def build_report(directory: str | Path) -> str:
    """Write DIR/report.md and its PNG plots for every eval and replay run under DIR; returns the Markdown."""
    directory = Path(directory)
    runs, replays = load_runs(directory), load_replay_runs(directory)
    if not runs and not replays:
        raise FileNotFoundError(f"no eval or replay runs (*.config.json) under {directory}")
    sections = ["# memshare report"]
    for dataset in sorted({r["dataset"] for r in runs}):
        sections.append(_section(directory, dataset, sorted((r for r in runs if r["dataset"] == dataset), key=_order)))
    for key in sorted({(r["config"]["traces"]["name"], r["config"]["model"]) for r in replays}):
        group = [r for r in replays if (r["config"]["traces"]["name"], r["config"]["model"]) == key]
        sections.append(_replay_section(directory, sorted(group, key=_order)))
    text = "\n\n".join(sections) + "\n"
    (directory / "report.md").write_text(text)
    return text
