"""`memshare eval`: every policy spec over a dataset's problems, graded as they finish, one resumable run each.

A run is `<out>/<dataset>/<name>.jsonl` (one record per problem, appended as it finishes, rewritten in problem
order once the run is complete), `<name>.config.json` (everything that determines the records; a resume must
match it) and `<name>.summary.json` (pass@1 and engine stats accumulated over the sessions that wrote the run).
A `=memshare` run's search runs each try as such a run under `<name>.tries/` and copies the closest one's records
and sessions to `<name>.jsonl` (`run_to_match`).
"""

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memshare.config import EngineConfig, ShareConfig
from memshare.engine.llm import LLM
from memshare.engine.stats import BYTES_KEYS, kv_bytes_saved, memory_saved
from memshare.errors import MemShareError
from memshare.eval.datasets import BUILTIN, DEFAULT_INSTRUCTION, Problem, chat_prompt, load_problems
from memshare.eval.grading import is_correct
from memshare.eval.policies import (
    PolicySpec,
    Try,
    check_kv_cache_dtypes,
    closest,
    engine_for,
    expand_kv_dtypes,
    expand_sweep,
    match_gap,
    matched,
    parse_policies,
    search_match,
)
from memshare.eval.report import parameters, read_records, safe_name, score
from memshare.outputs import RequestOutput
from memshare.sampling_params import SamplingParams

# Engine settings that change what is generated: without max_model_len the KV budget caps the context.
RESULT_ENGINE_KEYS = ("kv_cache_memory", "num_kv_blocks", "block_size", "max_model_len", "device", "dtype",
                      "kv_cache_dtype")
# Engine stats a session keeps to tell KV bytes saved in any KV dtype (engine/stats.py).
SESSION_BYTES_KEYS = ("kv_cache_dtype", *BYTES_KEYS)
METRIC_KEYS = ("kv_blocks_generated", "kv_blocks_affected", "num_preemptions", "time_to_first_token_s", "latency_s")


class ConfigMismatchError(MemShareError):
    """A run being resumed was written with another configuration; `fields` names the differences."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass(slots=True)
class EvalConfig:
    """What `memshare eval` runs: each spec of `policies` (see `parse_policies`, starting from `share`; expanded
    over `sweep`) over the dataset's first `limit` problems, `samples` per problem; problem i is seeded `seed + i`."""

    model: str
    dataset: str
    out: Path
    policies: str = "none,memshare"
    sweep: dict[str, list[str]] = field(default_factory=dict)  # see `expand_sweep`
    kv_cache_dtypes: list[str] = field(default_factory=lambda: ["auto"])  # every policy runs at each
    defaults: dict[str, Any] = field(default_factory=dict)  # policy fields every spec starts from
    problem_field: str = "problem"
    answer_field: str = "answer"
    limit: int | None = None
    samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int | None = 0
    instruction: str = DEFAULT_INSTRUCTION
    engine: dict[str, Any] = field(default_factory=dict)  # further EngineConfig keyword arguments

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        check_kv_cache_dtypes(self.kv_cache_dtypes)
        self.sampling(0)  # raises on bad sampling values before any model loads

    def sampling(self, index: int) -> SamplingParams:
        return SamplingParams(n=self.samples, temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens, seed=None if self.seed is None else self.seed + index)


@dataclass(slots=True)
class Run:
    name: str
    spec: PolicySpec
    path: Path
    memshare: "Run | None" = None  # the MemShare run whose memory saved a matched spec is searched to

    def sibling(self, suffix: str) -> Path:
        return self.path.with_suffix(suffix)


def dataset_name(dataset: str) -> str:
    return dataset if dataset in BUILTIN else Path(dataset).stem


def run_name(spec: PolicySpec, memshare: str | None) -> str:
    """The spec's label, plus the MemShare run it is matched to."""
    return f"{spec.label} vs {memshare}" if spec.match else spec.label


def plan_runs(specs: list[PolicySpec], directory: Path) -> list[Run]:
    runs: list[Run] = []
    memshare: Run | None = None
    for spec in specs:
        if spec.match and memshare is None:
            raise ValueError(f"{spec.label} is matched to a MemShare run, but no memshare policy is listed before it")
        source = memshare if spec.match else None
        name = run_name(spec, source.name if source else None)
        run = Run(name, spec, directory / f"{safe_name(name)}.jsonl", source)
        if any(r.path == run.path for r in runs):
            raise ValueError(f"policy {run.name!r} is listed twice (both would write {run.path.name})")
        runs.append(run)
        if spec.share.policy == "memshare":
            memshare = run
    return runs


def load(config: EvalConfig) -> list[Problem]:
    try:
        problems = load_problems(config.dataset, config.limit, config.problem_field, config.answer_field)
    except KeyError as error:
        raise ValueError(error.args[0]) from error
    ids = [p.problem_id for p in problems]
    if not problems or len(set(ids)) != len(ids):
        raise ValueError(f"dataset {config.dataset!r} has no problems or repeats a problem id")
    return problems


def run_config(config: EvalConfig, run: Run, share: ShareConfig, problems: list[Problem],
               match: dict[str, Any] | None) -> dict[str, Any]:
    fields = BUILTIN[config.dataset][1:] if config.dataset in BUILTIN else (config.problem_field, config.answer_field)
    digest = hashlib.sha256(json.dumps([[p.problem_id, p.question, p.answer] for p in problems]).encode())
    result = {
        "run": run.name, "model": config.model,
        "dataset": {"name": dataset_name(config.dataset), "source": config.dataset, "problem_field": fields[0],
                    "answer_field": fields[1], "limit": config.limit, "num_problems": len(problems),
                    "sha256": digest.hexdigest()},
        "instruction": config.instruction, "samples": config.samples,
        "sampling": asdict(config.sampling(0)) | {"seed": config.seed},  # problem i: seed + i
        "share": share.to_dict(),
        "engine": result_engine(engine_for(config.model, run.spec, config.engine)),
    }
    if match is not None:
        result["matched"] = match
    return json.loads(json.dumps(result))


def result_engine(engine: dict[str, Any], keys: tuple[str, ...] = RESULT_ENGINE_KEYS) -> dict[str, Any]:
    """The engine settings saved with a run's config: `keys` of `engine`, defaults filled in."""
    defaults = EngineConfig()
    return {k: engine.get(k, getattr(defaults, k)) for k in keys}


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [prefix.rstrip(".")]
    return [d for key in sorted(saved.keys() | current.keys())
            for d in _differences(saved.get(key), current.get(key), f"{prefix}{key}.")]


def check_config(run: Run, config: dict[str, Any]) -> None:
    """Raise ConfigMismatchError, touching nothing, if the run's saved config differs from `config`."""
    path = run.sibling(".config.json")
    if not path.exists():
        if run.path.exists() and run.path.stat().st_size:
            raise ConfigMismatchError(f"{run.path} holds records but has no {path.name} to resume against", [])
        return
    saved = json.loads(path.read_text())
    diffs = _differences(saved, config)
    if diffs:
        detail = "; ".join(f"{d}: saved {_get(saved, d)!r}, now {_get(config, d)!r}" for d in diffs)
        raise ConfigMismatchError(f"{run.path} was written with another configuration ({detail}); resume with the "
                                  "same options, or use another --out", diffs)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_record(problem: Problem, prompt: str, output: RequestOutput) -> dict[str, Any]:
    samples = [{"text": c.text, "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                "correct": is_correct(c.text, problem.answer)} for c in output.outputs]
    return {"problem_id": problem.problem_id, "prompt": prompt, "answer": problem.answer, "samples": samples,
            "pass@1": sum(s["correct"] for s in samples) / len(samples),
            **{k: output.metrics[k] for k in METRIC_KEYS}}


def session_stats(llm: LLM, wall_s: float, problems: int, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    s, stats = llm.llm_engine.stats, llm.stats()
    return {"problems": problems, "wall_time_s": wall_s, "generation_tokens": s.generation_tokens,
            "engine_time_s": s.engine_time_s, "sharing_time_s": s.sharing_time_s,
            "engine_cpu_time_s": stats["engine_cpu_time_s"], "num_threads_mean": stats["num_threads_mean"],
            "peak_used_blocks": s.peak_used_blocks, "peak_logical_blocks": s.peak_logical_blocks,
            "sum_used_blocks": s.sum_used_blocks, "sum_logical_blocks": s.sum_logical_blocks,
            "blocks_shared": stats.get("blocks_shared", 0), "num_preemptions": stats["num_preemptions"],
            "num_kv_blocks": stats["num_kv_blocks"], **{k: stats[k] for k in SESSION_BYTES_KEYS},
            "engine": engine_kwargs}


def aggregate(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Engine stats over all sessions of a run, from their raw counters, so that a resumed run's rates hold."""
    def total(key: str) -> float:
        return sum(s[key] for s in sessions)

    tokens, time_s, sharing = total("generation_tokens"), total("engine_time_s"), total("sharing_time_s")
    return {"generation_tokens": tokens, "engine_time_s": time_s, "wall_time_s": total("wall_time_s"),
            "generation_tokens_per_s": tokens / time_s if time_s else 0.0, **memory_saved(sessions),
            "blocks_shared": total("blocks_shared"), "num_preemptions": total("num_preemptions"),
            "kv_blocks_peak": max((s["peak_used_blocks"] for s in sessions), default=0), "sharing_time_s": sharing,
            "sharing_time_share": sharing / time_s if time_s else 0.0, **kv_bytes_saved(sessions),
            **cpu_use(sessions)}


def cpu_use(sessions: list[dict[str, Any]]) -> dict[str, float | None]:
    """The engine's CPU threads (mean over engine time) and the share of their CPU time it got: well below 1, other
    processes held its cores and its tok/s says more about them than about the policy. None for older sessions."""
    timed = [s for s in sessions if "num_threads_mean" in s]
    capacity = sum(s["engine_time_s"] * s["num_threads_mean"] for s in timed)
    time_s = sum(s["engine_time_s"] for s in timed)
    return {"num_threads_mean": capacity / time_s if time_s else None,
            "cpu_share": sum(s["engine_cpu_time_s"] for s in timed) / capacity if capacity else None}


def write_summary(run: Run, config: dict[str, Any], records: list[dict[str, Any]],
                  sessions: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {"run": run.name, "policy": config["share"]["policy"], "parameters": parameters(config["share"]),
               "matched": config.get("matched"), "model": config["model"], "dataset": config["dataset"]["name"],
               "complete": len(records) == config["dataset"]["num_problems"], **score(records),
               **aggregate(sessions), "sessions": sessions}
    write_atomic(run.sibling(".summary.json"), json.dumps(summary, indent=1))
    return summary


Record = dict[str, Any]
Requests = dict[str, tuple[list[int], SamplingParams]]
Work = Callable[[set[str], list[Record], list[Record]], None]
# One resumable run: (run, its share, its config's `matched` block, the work that fills it; None: generate).
RunOne = Callable[[Run, ShareConfig, Record | None, Work | None], Record]


def drive(llm: LLM, run: Run, requests: Requests, records: list[Record], sessions: list[Record], total: int,
          record: Callable[[RequestOutput], Record], session: Callable[[LLM, float, int], Record],
          summarize: Callable[[list[Record]], Record], postfix: Callable[[Record], str]) -> None:
    """The resumable run's loop: queue every request (all validated before any is queued), step the engine, and as
    each finishes append its record to the run's JSONL (fsynced) and rewrite the summary with this session's stats
    so far; then append the session to `sessions`."""
    engine = llm.llm_engine
    for token_ids, params in requests.values():
        engine.validate(token_ids, params)
    for request_id, (token_ids, params) in requests.items():
        engine.add_request(request_id, token_ids, params, token_ids)
    start, finished = time.perf_counter(), 0
    with open(run.path, "a") as f, tqdm(total=total, initial=len(records), desc=run.name, dynamic_ncols=True) as bar:
        while finished < len(requests):
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"engine stopped with {len(requests) - finished} requests of {run.name} unfinished")
            for output in engine.step():
                records.append(record(output))
                f.write(json.dumps(records[-1]) + "\n")
                f.flush()
                os.fsync(f.fileno())
                finished += 1
                current = session(llm, time.perf_counter() - start, finished)
                bar.update(1)
                bar.set_postfix_str(postfix(summarize([*sessions, current])), refresh=False)
    sessions.append(current)


def resume(run: Run, run_cfg: Record, key: str, order: dict[str, int],
           work: Callable[[set[str], list[Record], list[Record]], None],
           summarize: Callable[[list[Record], list[Record]], Record]) -> Record:
    """Open the run (its records and sessions so far), `work` on the inputs whose `key` is not done, write the
    records back in input order and return the summary."""
    records, sessions = open_run(run, run_cfg, key, order)
    done = {r[key] for r in records}
    if len(done) < len(order):
        work(done, records, sessions)
    records.sort(key=lambda r: order[r[key]])
    write_atomic(run.path, "".join(json.dumps(r) + "\n" for r in records))
    return summarize(records, sessions)


def generate(config: EvalConfig, run: Run, share: ShareConfig, todo: list[tuple[int, Problem]],
             records: list[dict[str, Any]], sessions: list[dict[str, Any]], run_cfg: dict[str, Any]) -> None:
    """Submit every unfinished problem at once; append each record (fsynced) and the summary as it finishes."""
    llm = LLM(model=config.model,
              **({"log_stats_interval": 0} | engine_for(config.model, run.spec, config.engine) | {"share": share}))
    tokenizer = llm.get_tokenizer()
    prompts = {p.problem_id: chat_prompt(tokenizer, p, config.instruction) for _, p in todo}
    requests = {p.problem_id: (prompts[p.problem_id], config.sampling(i)) for i, p in todo}
    problems = {p.problem_id: p for _, p in todo}
    drive(llm, run, requests, records, sessions, run_cfg["dataset"]["num_problems"],
          record=lambda out: make_record(problems[out.request_id], tokenizer.decode(prompts[out.request_id]), out),
          session=lambda llm, wall, done: session_stats(llm, wall, done, config.engine),
          summarize=lambda sessions: write_summary(run, run_cfg, records, sessions),
          postfix=lambda s: f"pass@1 {s['pass@1']:.1%}, {s['generation_tokens_per_s']:.1f} tok/s")
    del llm
    gc.collect()


def open_run(run: Run, run_cfg: dict[str, Any], key: str, ids: dict[str, int]) -> tuple[list[dict[str, Any]],
                                                                                   list[dict[str, Any]]]:
    """Check and write the run's config; return its records (keyed by `key`, all in `ids`) and sessions so far."""
    check_config(run, run_cfg)
    run.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(run.sibling(".config.json"), json.dumps(run_cfg, indent=1))
    records, size = read_records(run.path)
    if run.path.exists() and size < run.path.stat().st_size:
        os.truncate(run.path, size)  # a killed writer's half line: its item runs again
    if any(r[key] not in ids for r in records):
        raise ValueError(f"{run.path} holds records whose {key} is not among the inputs")
    summary_path = run.sibling(".summary.json")
    sessions = json.loads(summary_path.read_text())["sessions"] if summary_path.exists() else []
    return records, sessions


def run_one(config: EvalConfig, run: Run, share: ShareConfig, problems: list[Problem], match: Record | None = None,
            work: Work | None = None) -> dict[str, Any]:
    run_cfg = run_config(config, run, share, problems, match)

    def generate_todo(done: set[str], records: list[dict[str, Any]], sessions: list[dict[str, Any]]) -> None:
        todo = [(i, p) for i, p in enumerate(problems) if p.problem_id not in done]
        generate(config, run, share, todo, records, sessions, run_cfg)

    return resume(run, run_cfg, "problem_id", {p.problem_id: i for i, p in enumerate(problems)}, work or generate_todo,
                  lambda records, sessions: write_summary(run, run_cfg, records, sessions))


def try_run(run: Run, share: ShareConfig) -> Run:
    """The run of one try of a matched run's search, named by its knob values."""
    knobs = ", ".join(f"{k}={getattr(share, k)}" for k in run.spec.match)
    return Run(f"{run.name} at {knobs}", run.spec, run.sibling(".tries") / f"{safe_name(knobs)}.jsonl", run.memshare)


def saved_tries(run: Run) -> list[Try] | None:
    """The search a complete matched run recorded in its config: a rerun takes it instead of searching again."""
    config, summary = run.sibling(".config.json"), run.sibling(".summary.json")
    if not (config.exists() and summary.exists() and json.loads(summary.read_text())["complete"]):
        return None
    tries = json.loads(config.read_text()).get("matched", {}).get("tries")
    return [Try(t["level"], t["memory_saved"]) for t in tries] if tries else None


def copy_run(source: Run) -> Work:
    """Work that fills a run with the records and sessions of the complete run `source`."""
    def work(done: set[str], records: list[Record], sessions: list[Record]) -> None:
        records[:] = read_records(source.path)[0]
        sessions[:] = json.loads(source.sibling(".summary.json").read_text())["sessions"]

    return work


def run_to_match(run: Run, memshare: Record, one: RunOne) -> Record:
    """A `=memshare` run: `search_match` runs each try as a resumable run (`try_run`) until one saves about the
    memory `memshare` (the summary of `run.memshare`) saved, then the closest try's records and sessions become the
    run's, its config's `matched` block holding both measured figures, every try and `not_matched` (why the closest
    is more than MATCH_TOLERANCE off, else None). A rerun of a complete run skips the search."""
    target = memshare["memory_saved_mean"]
    tries = saved_tries(run)
    if tries is None:
        trial = {"memshare_run": memshare["run"], "trial_of": run.name}
        _, tries = search_match(run.spec, target, memshare["affected_ratio"],
                                lambda share: one(try_run(run, share), share, trial, None),
                                lambda summary: summary["memory_saved_mean"])
        for path in (run.path, run.sibling(".config.json"), run.sibling(".summary.json")):
            path.unlink(missing_ok=True)  # an unfinished copy or an earlier search's: the tries decide it anew
    best = closest(target, tries)
    share = matched(run.spec, best.level)
    match = {"memshare_run": memshare["run"], "memshare_memory_saved": target, "memory_saved": best.memory_saved,
             "not_matched": match_gap(run.spec, target, tries),
             "tries": [{"level": t.level, **{k: getattr(matched(run.spec, t.level), k) for k in run.spec.match},
                        "memory_saved": t.memory_saved} for t in tries]}
    return one(run, share, match, copy_run(try_run(run, share)))


def run_eval(config: EvalConfig) -> list[dict[str, Any]]:
    """Run every policy spec in order, each in its own engine; returns the runs' summaries.

    Rerunning the same configuration resumes: finished problems are kept, the others run. Raises
    ConfigMismatchError (before generating anything, where the run's config is known up front) if a run's saved
    configuration differs.
    """
    problems = load(config)
    specs = expand_kv_dtypes(expand_sweep(parse_policies(config.policies, config.defaults), config.sweep),
                             config.kv_cache_dtypes)
    runs = plan_runs(specs, config.out / dataset_name(config.dataset))
    for run in runs:  # fail now rather than after hours of earlier runs; matched configs are known only later
        if run.memshare is None:
            check_config(run, run_config(config, run, run.spec.share, problems, None))
    summaries: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.memshare is None:
            summaries[run.name] = run_one(config, run, run.spec.share, problems)
        else:
            summaries[run.name] = run_to_match(run, summaries[run.memshare.name], lambda r, share, match, work:
                                               run_one(config, r, share, problems, match, work))
    return list(summaries.values())
