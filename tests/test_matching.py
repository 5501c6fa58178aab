"""A `=memshare` baseline is matched by measurement: run, measure its memory saved, correct the knob, run again;
the report gives both measured figures and flags a pair it could not bring within MATCH_TOLERANCE."""

import json
from pathlib import Path

import pytest
import torch

from memshare import LLM, SamplingParams
from memshare.config import ShareConfig
from memshare.eval import harness
from memshare.eval.demo import write_traces
from memshare.eval.fidelity import model_tokenizer
from memshare.eval.harness import EvalConfig, run_eval
from memshare.eval.policies import MATCH_TOLERANCE, SEARCH_TOLERANCE, PolicySpec, parse_policies, run_matched
from memshare.eval.replay import read_trace_file, tokenize
from memshare.eval.report import build_report

from .conftest import MODEL


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_streamingllm_and_random_land_on_memshares_measured_memory_saved(tmp_path):
    """Two demo traces of 96 forced tokens in blocks of 4: MemShare's affected ratio (the old formula) puts both
    baselines off its memory saved; the search brings each within MATCH_TOLERANCE."""
    tokenizer = model_tokenizer(MODEL)
    traces = tokenize(tokenizer, read_trace_file(write_traces(tmp_path / "t.jsonl", tokenizer, 2, 96)), 96)
    tries: dict[str, list[float]] = {}

    def run(spec: PolicySpec, share: ShareConfig) -> dict:
        llm = LLM(model=MODEL, share=share, block_size=4, num_kv_blocks=160, num_threads=1, log_stats_interval=0)
        llm.generate([{"prompt_token_ids": t.prompt_token_ids} for t in traces],
                     [SamplingParams(temperature=0, max_tokens=len(t.token_ids), ignore_eos=True,
                                     forced_token_ids=t.token_ids) for t in traces], use_tqdm=False)
        stats = llm.stats()
        tries.setdefault(share.policy, []).append(stats["memory_saved_mean"])
        return stats

    specs = parse_policies("memshare:step_threshold=0.5:block_threshold=0.5,streamingllm:kv_budget=memshare,"
                           "random:share_ratio=memshare")
    memshare, *baselines = run_matched(specs, run, lambda s: s["memory_saved_mean"], lambda s: s["affected_ratio"])
    target = memshare["memory_saved_mean"]
    assert target > 0.1
    for policy, result in zip(("streamingllm", "random"), baselines):
        assert abs(tries[policy][0] - target) > SEARCH_TOLERANCE  # the formula alone misses
        assert abs(result["memory_saved_mean"] - target) <= MATCH_TOLERANCE, (policy, tries[policy], target)


def saved_by(share: ShareConfig) -> float:
    """Memory saved a fake run reports: MemShare 25%; h2o smooth in its budget; streamingllm jumps from 0 to 60% at
    kv_budget 0.5; random never passes 10%."""
    return {"memshare": 0.25, "h2o": 0.6 * (1 - getattr(share, "kv_budget", 1)),
            "streamingllm": 0.6 * (getattr(share, "kv_budget", 1) <= 0.5),
            "random": min(getattr(share, "share_ratio", 0), 0.1)}.get(share.policy, 0.0)


def fake_generate(config, run, share, todo, records, sessions, run_cfg):
    calls.append(run.name)
    for _, p in todo:
        records.append({"problem_id": p.problem_id, "prompt": p.question, "answer": p.answer,
                        "samples": [{"text": "", "num_tokens": 4, "finish_reason": "length", "correct": False}],
                        "pass@1": 0.0, "kv_blocks_generated": 4, "kv_blocks_affected": 1, "num_preemptions": 0,
                        "time_to_first_token_s": 0.0, "latency_s": 0.0})
    used = 1000 * (1 - saved_by(share))
    sessions.append({"problems": len(todo), "wall_time_s": 1.0, "generation_tokens": 8, "engine_time_s": 1.0,
                     "sharing_time_s": 0.0, "peak_used_blocks": used / 10, "peak_logical_blocks": 100,
                     "sum_used_blocks": used, "sum_logical_blocks": 1000, "blocks_shared": 0, "num_preemptions": 0,
                     "num_kv_blocks": 64})


calls: list[str] = []


def test_search_is_recorded_resumes_and_the_report_flags_an_unreachable_match(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "generate", fake_generate)
    calls.clear()
    config = EvalConfig(model=MODEL, dataset="gsm8k", out=tmp_path, limit=2, policies="none,memshare,"
                        "h2o:kv_budget=memshare,random:share_ratio=memshare,streamingllm:kv_budget=memshare")
    summaries = {s["policy"]: s for s in run_eval(config)}
    h2o, rand, streaming = summaries["h2o"], summaries["random"], summaries["streamingllm"]
    assert abs(h2o["memory_saved_mean"] - 0.25) <= SEARCH_TOLERANCE and h2o["matched"]["not_matched"] is None
    assert len(h2o["matched"]["tries"]) > 1 and h2o["matched"]["tries"][0]["kv_budget"] == 0.75
    assert rand["matched"]["not_matched"] == "even share_ratio=1 saves only 10.0%"
    assert "the knob steps over the target" in streaming["matched"]["not_matched"]
    assert len(calls) == 2 + sum(len(s["matched"]["tries"]) for s in (h2o, rand, streaming))

    report = build_report(tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert "(matched to memshare(step_threshold=0.9, block_threshold=0.8): 25.0% vs 25.0% memory saved)" in rows["h2o"]
    assert "NOT matched: 10.0% vs 25.0% memory saved; even share_ratio=1 saves only 10.0%)" in rows["random"]
    assert "NOT matched: 0.0% vs 25.0% memory saved; kv_budget=0.5" in rows["streamingllm"]
    assert "(matched to" not in rows["random"] + rows["streamingllm"] and report.count(" at kv_budget=") == 0

    # A rerun takes the recorded search, even with the tries gone; a run killed after its search redoes the search
    # from its tries, which are complete, so nothing generates.
    calls.clear()
    directory = tmp_path / "gsm8k"
    for tries in directory.glob("h2o*.tries"):
        for path in tries.iterdir():
            path.unlink()
        tries.rmdir()
    assert [s["memory_saved_mean"] for s in run_eval(config)] == [s["memory_saved_mean"] for s in summaries.values()]
    killed = next(directory.glob("random*.summary.json"))
    killed.unlink()
    assert {s["policy"]: s for s in run_eval(config)}["random"]["matched"] == rand["matched"] and calls == []
    assert json.loads(killed.read_text())["complete"]


def test_matched_runs_name_every_try_in_their_config(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "generate", fake_generate)
    run_eval(EvalConfig(model=MODEL, dataset="gsm8k", out=tmp_path, limit=1,
                        policies="memshare,h2o:kv_budget=memshare"))
    config = json.loads(next(Path(tmp_path / "gsm8k").glob("h2o*.config.json")).read_text())
    best = min(config["matched"]["tries"], key=lambda t: abs(t["memory_saved"] - 0.25))
    assert config["share"]["kv_budget"] == best["kv_budget"] and config["matched"]["memshare_memory_saved"] == 0.25
    tries = sorted(p.name for p in next(Path(tmp_path / "gsm8k").glob("h2o*.tries")).glob("*.config.json"))
    assert tries == sorted(f"kv_budget={t['kv_budget']}.config.json" for t in config["matched"]["tries"])
