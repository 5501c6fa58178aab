"""`memshare replay`: teacher-force real reasoning traces through each policy under one KV budget.

Every trace is submitted at once and every policy produces the trace's own tokens (forced decoding), so the output
tokens/s of two policies compare identical work. The dense run (policy `none`, always run first) keeps, per token,
its top-k log-probabilities; every later run scores its own next-token distribution against them in a logits
processor, token by token, inside the same run that is timed: KL(dense || policy) over the dense top-k plus one
bucket for the rest of the vocabulary (a lower bound of the full KL, tight when the top-k holds most of the mass),
and top-1 agreement (same argmax).

Layout as in `memshare eval`: `<out>/<traces>/<run>.jsonl` (one record per trace, appended as it finishes; rerun =
resume), `<run>.config.json`, `<run>.summary.json` (throughput, batch and memory per session) and, for the dense
run, `<run>.reference/` (the top-k per trace, which later runs score against).
"""

import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memshare.config import ShareConfig
from memshare.engine.llm import LLM
from memshare.errors import MemShareError
from memshare.eval.fidelity import Trace, model_tokenizer
from memshare.eval.harness import (
    RESULT_ENGINE_KEYS,
    Record,
    Run,
    Work,
    aggregate,
    check_config,
    drive,
    plan_runs,
    result_engine,
    resume,
    run_to_match,
    session_stats,
    write_atomic,
)
from memshare.eval.policies import (
    check_kv_cache_dtypes,
    engine_for,
    expand_kv_dtypes,
    expand_sweep,
    parse_policies,
)
from memshare.eval.report import safe_name
from memshare.outputs import RequestOutput
from memshare.sampling_params import SamplingParams

PROMPT_FIELDS = ("prompt", "question", "messages")
STABLE_KEYS = ("trace_id", "prompt_tokens", "forced_tokens", "output_tokens", "tokens_match", "kv_blocks_generated")


class TraceFileError(MemShareError, ValueError):
    """A trace file line is not JSON, lacks its prompt or response, or has an empty response."""


@dataclass(slots=True)
class TraceRow:
    trace_id: str
    prompt: str | list[dict[str, str]]
    response: str


def _shapes(prompt_field: str | None, response_field: str) -> str:
    prompt = f'"{prompt_field}"' if prompt_field else '"prompt"/"question"'
    messages = f'"{prompt_field}"' if prompt_field else '"messages"'
    return (f'accepted lines: {{{prompt}: "...", "{response_field}": "..."}}, '
            f'{{{messages}: [{{"role": "user", "content": "..."}}, ...], "{response_field}": "..."}}, '
            f'{{{messages}: [..., {{"role": "assistant", "content": "<response>"}}]}}')


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _row(path: Path, line_no: int, line: str, prompt_field: str | None, response_field: str) -> TraceRow:
    def error(reason: str) -> TraceFileError:
        return TraceFileError(f"{path}:{line_no}: {reason}; {_shapes(prompt_field, response_field)}")

    try:
        row = json.loads(line)
    except json.JSONDecodeError as failure:
        raise error(f"not JSON ({failure.msg})") from failure
    if not isinstance(row, dict):
        raise error("a trace must be a JSON object")
    names = [prompt_field] if prompt_field else [f for f in PROMPT_FIELDS if f in row]
    if not names or names[0] not in row:
        raise error(f"no prompt field ({prompt_field or ' / '.join(PROMPT_FIELDS)})")
    prompt, response, source = row[names[0]], row.get(response_field), f"response {response_field!r}"
    # a logged chat ends with the assistant's reply: that reply is the response, the turns before it the prompt
    if response is None and _is_messages(prompt) and prompt[-1]["role"] == "assistant":
        prompt, response, source = prompt[:-1], prompt[-1]["content"], "the final assistant message"
        if not prompt:
            raise error(f"{names[0]!r} holds only the assistant's reply, no prompt turns before it")
    if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
        raise error(f"{names[0]!r} must be non-empty text or a list of {{role, content}} messages")
    if response is None:
        raise error(f"no response field {response_field!r}")
    if not isinstance(response, str) or not response.strip():
        raise error(f"{source} is empty or not text")
    return TraceRow(str(row.get("id", line_no)), prompt, response)


def read_trace_file(path: str | Path, prompt_field: str | None = None, response_field: str = "response",
                    limit: int | None = None) -> list[TraceRow]:
    """Rows of a JSONL trace file: the prompt (`prompt_field`, else the first of `prompt`, `question`, `messages`;
    text or OpenAI messages) and the response to force (`response_field`, else the final assistant message of a
    chat log); raises TraceFileError naming the bad line and the accepted shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    rows: list[TraceRow] = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(_row(path, line_no, line, prompt_field, response_field))
    ids = [r.trace_id for r in rows]
    if not rows:
        raise TraceFileError(f"{path}: no traces")
    if len(set(ids)) != len(ids):
        raise TraceFileError(f"{path}: trace ids repeat")
    return rows


def tokenize(tokenizer: Any, rows: list[TraceRow], max_tokens: int) -> list[Trace]:
    """Prompts in the model's chat template (text becomes the user turn); responses cut at `max_tokens` tokens."""
    traces = []
    for row in rows:
        messages = [{"role": "user", "content": row.prompt}] if isinstance(row.prompt, str) else row.prompt
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        response = tokenizer.encode(row.response, add_special_tokens=False)[:max_tokens]
        traces.append(Trace(row.trace_id, list(prompt), response))
    return traces


class ReferenceProbe:
    """A logits processor that changes nothing: it records the dense top-k per position (`reference` None) or
    scores the policy's distribution against the dense top-k, and the forced token's log-probability."""

    def __init__(self, forced: list[int], top_k: int, reference: dict[str, np.ndarray] | None) -> None:
        self.forced = forced
        self.top_k = top_k
        self.reference = reference
        n = len(forced)
        self.top_ids = np.zeros((n, top_k), np.int32)
        self.top_logprobs = np.zeros((n, top_k), np.float32)
        self.kl = np.zeros(n)
        self.top1 = np.zeros(n, bool)
        self.logprob = np.zeros(n)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        position = len(output_ids)
        logprobs = logits.float().log_softmax(dim=-1)
        self.logprob[position] = float(logprobs[self.forced[position]])
        if self.reference is None:
            values, ids = logprobs.topk(self.top_k)
            self.top_ids[position], self.top_logprobs[position] = ids.numpy(), values.numpy()
            return logits
        ids = torch.from_numpy(self.reference["ids"][position]).long()
        p = torch.from_numpy(self.reference["logprobs"][position]).double()
        q = logprobs[ids].double()
        p_rest = (1 - p.exp().sum()).clamp_min(0)
        q_rest = (1 - q.exp().sum()).clamp_min(1e-12)
        kl = (p.exp() * (p - q)).sum() + (p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()))
        self.kl[position] = max(float(kl), 0.0)
        self.top1[position] = int(logprobs.argmax()) == int(ids[0])
        return logits


@dataclass(slots=True)
class ReplayConfig:
    """What `memshare replay` runs: every spec of `policies` (dense first), expanded over `sweep`, forcing the
    responses of the trace file `traces`, each cut at `max_tokens` tokens, with all traces submitted at once."""

    model: str
    traces: Path
    out: Path
    policies: str = "none,memshare"
    sweep: dict[str, list[str]] = field(default_factory=dict)
    kv_cache_dtypes: list[str] = field(default_factory=lambda: ["auto"])  # every policy runs at each
    defaults: dict[str, Any] = field(default_factory=dict)  # policy fields every spec starts from
    prompt_field: str | None = None
    response_field: str = "response"
    limit: int | None = None
    max_tokens: int = 2048
    top_k: int = 20
    engine: dict[str, Any] = field(default_factory=dict)  # further EngineConfig keyword arguments

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.top_k < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("max_tokens, top_k and limit must be >= 1")
        check_kv_cache_dtypes(self.kv_cache_dtypes)


def run_config(config: ReplayConfig, run: Run, share: ShareConfig, traces: list[Trace],
               match: dict[str, Any] | None) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([[t.trace_id, t.prompt_token_ids, t.token_ids] for t in traces]).encode())
    result = {
        "kind": "replay", "run": run.name, "model": config.model,
        "traces": {"name": Path(config.traces).stem, "source": str(config.traces), "prompt_field": config.prompt_field,
                   "response_field": config.response_field, "limit": config.limit, "num_traces": len(traces),
                   "max_tokens": config.max_tokens, "forced_tokens": sum(len(t.token_ids) for t in traces),
                   "sha256": digest.hexdigest()},
        "top_k": config.top_k, "share": share.to_dict(),
        "engine": result_engine(engine_for(config.model, run.spec, config.engine),
                                (*RESULT_ENGINE_KEYS, "max_num_seqs", "max_num_batched_tokens")),
    }
    if match is not None:
        result["matched"] = match
    return json.loads(json.dumps(result))


def _reference_path(directory: Path, trace_id: str) -> Path:
    return directory / f"{safe_name(trace_id)}.npz"


def load_reference(directory: Path, trace: Trace) -> dict[str, np.ndarray]:
    path = _reference_path(directory, trace.trace_id)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the dense run's reference for trace {trace.trace_id!r}; "
                                f"delete {directory.parent} or rerun the dense run")
    with np.load(path) as data:
        return {"ids": data["ids"], "logprobs": data["logprobs"]}


def make_record(trace: Trace, output_ids: list[int], probe: ReferenceProbe, metrics: dict[str, float],
                dense: bool) -> dict[str, Any]:
    n = len(trace.token_ids)
    return {"trace_id": trace.trace_id, "prompt_tokens": len(trace.prompt_token_ids), "forced_tokens": n,
            "output_tokens": len(output_ids), "tokens_match": output_ids == trace.token_ids,
            "kl_sum": None if dense else float(probe.kl.sum()), "kl_mean": None if dense else float(probe.kl.mean()),
            "top1": None if dense else float(probe.top1.mean()), "logprob_mean": float(probe.logprob.mean()),
            "kv_blocks_generated": metrics["kv_blocks_generated"], "kv_blocks_affected": metrics["kv_blocks_affected"],
            "num_preemptions": metrics["num_preemptions"], "latency_s": metrics["latency_s"]}


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted KL and top-1 over the records, forced tokens, and the affected ratio of their blocks."""
    tokens = sum(r["output_tokens"] for r in records)
    scored = [r for r in records if r["kl_sum"] is not None]
    scored_tokens = sum(r["output_tokens"] for r in scored)
    generated = sum(r["kv_blocks_generated"] for r in records)
    return {"num_traces": len(records), "output_tokens": tokens,
            "tokens_match": all(r["tokens_match"] for r in records),
            "kl": sum(r["kl_sum"] for r in scored) / scored_tokens if scored_tokens else None,
            "top1": sum(r["top1"] * r["output_tokens"] for r in scored) / scored_tokens if scored_tokens else None,
            "logprob_mean": sum(r["logprob_mean"] * r["output_tokens"] for r in records) / tokens if tokens else 0.0,
            "affected_ratio": sum(r["kv_blocks_affected"] for r in records) / generated if generated else 0.0}


def _session(llm: LLM, wall_s: float, done: int, engine: dict[str, Any]) -> dict[str, Any]:
    stats = llm.stats()
    return session_stats(llm, wall_s, done, engine) | {
        "num_recomputed_tokens": stats["num_recomputed_tokens"], "num_steps": stats["num_steps"],
        "num_running_peak": stats["num_running_peak"], "num_running_mean": stats["num_running_mean"],
        "kv_history": llm.kv_history()}


def write_summary(run: Run, config: dict[str, Any], records: list[dict[str, Any]],
                  sessions: list[dict[str, Any]]) -> dict[str, Any]:
    totals = aggregate(sessions)
    steps = sum(s["num_steps"] for s in sessions)
    wall = totals["wall_time_s"]
    summary = {"run": run.name, "policy": config["share"]["policy"], "model": config["model"],
               "traces": config["traces"]["name"], "complete": len(records) == config["traces"]["num_traces"],
               **score(records), **totals,
               "output_tokens_per_s": sum(r["output_tokens"] for r in records) / wall if wall else 0.0,
               "num_recomputed_tokens": sum(s["num_recomputed_tokens"] for s in sessions), "num_steps": steps,
               "num_running_peak": max((s["num_running_peak"] for s in sessions), default=0),
               "num_running_mean": sum(s["num_running_mean"] * s["num_steps"] for s in sessions) / steps if steps
               else 0.0,
               "kv_blocks_mean": sum(s["sum_used_blocks"] for s in sessions) / steps if steps else 0.0,
               "matched": config.get("matched"), "sessions": sessions}
    write_atomic(run.sibling(".summary.json"), json.dumps(summary, indent=1))
    return summary


def replay(config: ReplayConfig, run: Run, share: ShareConfig, todo: list[Trace], reference: Path, dense: bool,
           records: list[dict[str, Any]], sessions: list[dict[str, Any]], run_cfg: dict[str, Any]) -> None:
    """Submit every unfinished trace at once; append each record (fsynced) and the summary as it finishes."""
    llm = LLM(model=config.model,
              **({"log_stats_interval": 0} | engine_for(config.model, run.spec, config.engine) | {"share": share}))
    probes = {t.trace_id: ReferenceProbe(t.token_ids, config.top_k, None if dense else load_reference(reference, t))
              for t in todo}
    requests = {t.trace_id: (t.prompt_token_ids, SamplingParams(
        temperature=0, max_tokens=len(t.token_ids), ignore_eos=True, forced_token_ids=t.token_ids,
        logits_processors=[probes[t.trace_id]])) for t in todo}
    by_id = {t.trace_id: t for t in todo}
    reference.mkdir(parents=True, exist_ok=True)

    def record(output: RequestOutput) -> dict[str, Any]:
        trace, probe = by_id[output.request_id], probes[output.request_id]
        if dense:
            np.savez(_reference_path(reference, trace.trace_id), ids=probe.top_ids, logprobs=probe.top_logprobs)
        return make_record(trace, output.outputs[0].token_ids, probe, output.metrics, dense)

    def postfix(summary: dict[str, Any]) -> str:
        kl = "" if summary["kl"] is None else f", KL {summary['kl']:.4f}"
        return f"{summary['output_tokens_per_s']:.1f} tok/s{kl}"

    drive(llm, run, requests, records, sessions, run_cfg["traces"]["num_traces"], record,
          lambda llm, wall, done: _session(llm, wall, done, config.engine),
          lambda sessions: write_summary(run, run_cfg, records, sessions), postfix)
    del llm
    gc.collect()


def run_one(config: ReplayConfig, run: Run, share: ShareConfig, traces: list[Trace], reference: Path, dense: bool,
            match: Record | None = None, work: Work | None = None) -> dict[str, Any]:
    run_cfg = run_config(config, run, share, traces, match)

    def replay_todo(done: set[str], records: list[dict[str, Any]], sessions: list[dict[str, Any]]) -> None:
        replay(config, run, share, [t for t in traces if t.trace_id not in done], reference, dense, records,
               sessions, run_cfg)

    return resume(run, run_cfg, "trace_id", {t.trace_id: i for i, t in enumerate(traces)}, work or replay_todo,
                  lambda records, sessions: write_summary(run, run_cfg, records, sessions))


def load_traces(config: ReplayConfig) -> list[Trace]:
    rows = read_trace_file(config.traces, config.prompt_field, config.response_field, config.limit)
    return tokenize(model_tokenizer(config.model), rows, config.max_tokens)


def run_replay(config: ReplayConfig) -> list[dict[str, Any]]:
    """Run dense, then every other policy spec, each in its own engine; returns the runs' summaries.

    Rerunning the same configuration resumes. Raises ConfigMismatchError before replaying anything where a run's
    saved configuration differs (matched runs: once their MemShare run is known). A `=memshare` run is searched
    until it saves MemShare's memory (`run_to_match`).
    """
    traces = load_traces(config)
    specs = expand_kv_dtypes(expand_sweep(parse_policies(config.policies, config.defaults), config.sweep),
                             config.kv_cache_dtypes)
    dense = parse_policies("none")[0]  # dense at the model's own dtype: what every KL is measured against
    specs = [dense, *(s for s in specs if s != dense)]
    runs = plan_runs(specs, config.out / safe_name(Path(config.traces).stem))
    reference = runs[0].sibling(".reference")  # the dense run's top-k, per trace
    for run in runs:
        if run.memshare is None:
            check_config(run, run_config(config, run, run.spec.share, traces, None))
    summaries: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.memshare is None:
            summaries[run.name] = run_one(config, run, run.spec.share, traces, reference, run is runs[0])
        else:
            summaries[run.name] = run_to_match(run, summaries[run.memshare.name], lambda r, share, match, work:
                                               run_one(config, r, share, traces, reference, False, match, work))
    return list(summaries.values())
