"""`memshare eval` (resumable, lossless runs) and `memshare report` (tables and plots)."""

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memshare.config import ShareConfig, share_config
from memshare.entrypoints.cli import main
from memshare.eval import harness
from memshare.eval.harness import ConfigMismatchError, EvalConfig, plan_runs, run_eval
from memshare.eval.policies import parse_policies
from memshare.eval.report import (
    build_report,
    load_runs,
    load_warning,
    paired_delta,
    plot_accuracy_vs_memory,
    plot_threshold_sweep,
    read_records,
    score,
)

from .conftest import MODEL

# Greedy and one sequence at a time: slow enough to kill between problems, and the same tokens on every run.
ARGS = ["eval", "--model", MODEL, "--dataset", "gsm8k", "--limit", "4", "--policies", "none", "--temperature", "0",
        "--max-tokens", "16", "--kv-cache-memory", "64MiB", "--max-num-seqs", "1"]
VARYING = ("time_to_first_token_s", "latency_s", "num_preemptions")


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VARYING} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    main([*ARGS, "--out", str(out)])
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    return tmp_path / "gsm8k" / "none.jsonl"


def test_uninterrupted_run_writes_graded_records_in_order_and_a_summary(uninterrupted):
    records, size = read_records(uninterrupted / "gsm8k" / "none.jsonl")
    assert [r["problem_id"] for r in records] == ["0", "1", "2", "3"]
    assert records[0]["answer"] == "18" and "ducks" in records[0]["prompt"] and "\\boxed{}" in records[0]["prompt"]
    assert all(len(r["samples"]) == 1 and r["samples"][0]["num_tokens"] <= 16 for r in records)
    assert all(r["kv_blocks_generated"] >= 1 and r["latency_s"] > 0 for r in records)
    summary = json.loads((uninterrupted / "gsm8k" / "none.summary.json").read_text())
    assert summary["complete"] and summary["num_problems"] == 4 and len(summary["sessions"]) == 1
    assert summary["generation_tokens"] == sum(r["samples"][0]["num_tokens"] for r in records)
    config = json.loads((uninterrupted / "gsm8k" / "none.config.json").read_text())
    assert config["sampling"]["max_tokens"] == 16 and config["share"]["policy"] == "none"
    assert config["engine"]["kv_cache_memory"] == "64MiB" and config["dataset"]["num_problems"] == 4


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    jsonl, summary = tmp_path / "gsm8k" / "none.jsonl", tmp_path / "gsm8k" / "none.summary.json"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "memshare.entrypoints.cli", *ARGS, "--out", str(tmp_path)],
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    # The summary is written after the record: once it counts a problem, that problem's line is complete.
    while not (summary.exists() and json.loads(summary.read_text())["num_problems"] >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed = read_records(jsonl)[0]
    assert 1 <= len(killed) < 4, "the run was not killed midway"
    main([*ARGS, "--out", str(tmp_path)])
    resumed = read_records(jsonl)[0]
    assert stable(resumed) == stable(read_records(uninterrupted / "gsm8k" / "none.jsonl")[0])
    assert all(r in resumed for r in killed)  # kept with their timings: not generated again
    sessions = json.loads(summary.read_text())["sessions"]
    assert len(sessions) == 2 and [s["problems"] for s in sessions] == [len(killed), 4 - len(killed)]
    tokens = json.loads(summary.read_text())["generation_tokens"]
    assert tokens == sum(s["generation_tokens"] for s in sessions) == sum(r["samples"][0]["num_tokens"]
                                                                           for r in resumed)


def test_truncated_last_line_is_dropped_and_its_problem_rerun(tmp_path, uninterrupted):
    jsonl = copy_run(uninterrupted, tmp_path)
    data = jsonl.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    jsonl.write_bytes(data[:len(data) - len(last) // 2 - 1])
    assert len(read_records(jsonl)[0]) == 3
    main([*ARGS, "--out", str(tmp_path)])
    records, expected = read_records(jsonl)[0], read_records(uninterrupted / "gsm8k" / "none.jsonl")[0]
    assert records[:3] == expected[:3] and stable(records) == stable(expected)
    assert records[3]["latency_s"] != expected[3]["latency_s"]
    assert len(json.loads((tmp_path / "gsm8k" / "none.summary.json").read_text())["sessions"]) == 2


def test_config_mismatch_raises_and_leaves_the_run_untouched(tmp_path, uninterrupted, capsys, monkeypatch):
    jsonl = copy_run(uninterrupted, tmp_path)
    before = {p: p.read_bytes() for p in jsonl.parent.iterdir()}
    config = EvalConfig(model=MODEL, dataset="gsm8k", out=tmp_path, policies="none", limit=4, temperature=0,
                        max_tokens=8, engine={"kv_cache_memory": "64MiB", "max_num_seqs": 1})
    with pytest.raises(ConfigMismatchError, match="sampling.max_tokens: saved 16, now 8") as error:
        run_eval(config)
    assert error.value.fields == ["sampling.max_tokens"]
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGS, "--out", str(tmp_path), "--instruction", "Answer."])
    assert exit_info.value.code == 2 and "instruction" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in jsonl.parent.iterdir()} == before
    # The same configuration again: everything is done, so no model loads and the records stay as they are.
    monkeypatch.setattr(harness, "LLM", None)
    main([*ARGS, "--out", str(tmp_path)])
    assert jsonl.read_bytes() == before[jsonl]


def fake_generate(config, run, share, todo, records, sessions, run_cfg):
    """Records without a model, finishing last problem first: MemShare affects 1 of every 4 generated blocks."""
    affected = 1 if share.policy == "memshare" else 0
    for _, p in reversed(todo):
        records.append({"problem_id": p.problem_id, "prompt": p.question, "answer": p.answer,
                        "samples": [{"text": "", "num_tokens": 4, "finish_reason": "length", "correct": False}],
                        "pass@1": 0.0, "kv_blocks_generated": 4, "kv_blocks_affected": affected,
                        "num_preemptions": 0, "time_to_first_token_s": 0.0, "latency_s": 0.0})


def test_matched_policies_take_the_preceding_memshare_ratio(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "generate", fake_generate)
    config = EvalConfig(model=MODEL, dataset="gsm8k", out=tmp_path, limit=2, policies="none,memshare,"
                        "random:share_ratio=memshare,h2o:kv_budget=memshare")
    summaries = run_eval(config)
    assert [s["affected_ratio"] for s in summaries] == [0.0, 0.25, 0.0, 0.0]
    assert [r["problem_id"] for r in read_records(tmp_path / "gsm8k" / "none.jsonl")[0]] == ["0", "1"]
    configs = {c["run"]: c for c in map(json.loads, map(Path.read_text, (tmp_path / "gsm8k").glob("*.config.json")))}
    random_config = configs["random(share_ratio=memshare) vs memshare(step_threshold=0.9, block_threshold=0.8)"]
    # No sessions, so nothing saves memory: the first try, at MemShare's affected ratio, is already within reach.
    assert random_config["share"]["share_ratio"] == 0.25 and random_config["matched"]["tries"] == [
        {"level": 0.25, "share_ratio": 0.25, "memory_saved": 0.0}]
    assert configs["h2o(kv_budget=memshare) vs memshare(step_threshold=0.9, block_threshold=0.8)"]["share"][
        "kv_budget"] == 0.75


def test_run_names_are_distinct_and_matched_to_the_memshare_run_before():
    specs = parse_policies("none,memshare:block_threshold=0.6,random:share_ratio=memshare,"
                           "memshare:min_step_tokens=8,h2o:kv_budget=memshare")
    runs = plan_runs(specs, Path("out"))
    assert [r.name for r in runs] == [
        "none", "memshare(step_threshold=0.9, block_threshold=0.6)",
        "random(share_ratio=memshare) vs memshare(step_threshold=0.9, block_threshold=0.6)",
        "memshare(step_threshold=0.9, block_threshold=0.8, min_step_tokens=8)",
        "h2o(kv_budget=memshare) vs memshare(step_threshold=0.9, block_threshold=0.8, min_step_tokens=8)"]
    assert runs[1].path == Path("out/memshare_step_threshold=0.9_block_threshold=0.6.jsonl")
    assert runs[2].memshare is runs[1] and runs[4].memshare is runs[3] and runs[0].memshare is None
    with pytest.raises(ValueError, match="no memshare policy is listed before"):
        plan_runs(parse_policies("random:share_ratio=memshare,memshare"), Path("out"))
    with pytest.raises(ValueError, match="listed twice"):
        plan_runs(parse_policies("none,memshare,none"), Path("out"))


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "no/such/aime.jsonl"], "neither"),
    (["--policies", "none,dense"], "unknown policy 'dense'"),
    (["--policies", "memshare:threshold=0.5"], "bad override"),
    (["--samples", "0"], "samples must be >= 1"),
    (["--share", "memshare"], "--policies"),
])
def test_bad_eval_arguments_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGS, "--out", str(tmp_path), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.jsonl"))


def record(problem_id: str, correct: list[bool], generated: int = 4, affected: int = 1) -> dict:
    return {"problem_id": problem_id, "samples": [{"text": "", "num_tokens": 10 * (i + 1),
                                                   "finish_reason": "length" if i == 3 else "stop",
                                                   "correct": c} for i, c in enumerate(correct)],
            "kv_blocks_generated": generated, "kv_blocks_affected": affected}


def test_pass_at_1_and_its_confidence_interval():
    records = [record("a", [True, True, False, False]), record("b", [True] * 4), record("c", [False] * 4),
               record("d", [True, False, False, False])]
    s = score(records)
    passes = [0.5, 1.0, 0.0, 0.25]
    std = math.sqrt(sum((p - 0.4375) ** 2 for p in passes) / 3)
    assert s["pass@1"] == pytest.approx(0.4375) and s["ci95"] == pytest.approx(1.96 * std / 2)
    assert s["ci_low"] == pytest.approx(0.4375 - 1.96 * std / 2) and s["num_problems"] == 4
    assert s["mean_output_tokens"] == 25 and s["affected_ratio"] == 0.25 and s["truncated"] == 0.25
    clipped = score([record(str(i), [i < 3]) for i in range(4)])  # 0.75 ± 0.49
    assert clipped["ci95"] == pytest.approx(0.49) and clipped["ci_high"] == 1.0 and clipped["ci_low"] > 0.25
    assert score([record("a", [True])])["ci95"] == 0.0


def write_run(directory: Path, dataset: str, name: str, share: ShareConfig, records: list[dict],
              memory_saved: float, matched_to: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / name
    config = {"run": name, "model": MODEL, "dataset": {"name": dataset, "num_problems": 4}, "share": share.to_dict()}
    if matched_to:
        config["matched"] = {"memshare_run": matched_to, "memshare_affected_ratio": 0.25}
    Path(f"{stem}.config.json").write_text(json.dumps(config))
    Path(f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    Path(f"{stem}.summary.json").write_text(json.dumps({
        "memory_saved_mean": memory_saved, "memory_saved_peak": 2 * memory_saved, "generation_tokens_per_s": 12.5,
        "num_preemptions": 3}))


def test_paired_delta_counts_only_problems_both_ran():
    mean, ci, n = paired_delta({"a": 1.0, "b": 0.0, "c": 1.0, "x": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "y": 0.0})
    assert n == 3 and mean == pytest.approx(-1 / 3)
    assert ci == pytest.approx(1.96 * statistics.stdev([0.0, -1.0, 0.0]) / math.sqrt(3))


def test_plots_keep_ablations_and_variants_in_their_own_series(tmp_path):
    full = [record(str(i), [i < 3]) for i in range(4)]
    for name, share in {"ms8": share_config("memshare"),
                        "ms6": share_config("memshare", block_threshold=0.6),
                        "emb6": share_config("memshare", block_threshold=0.6, stage1="embedding"),
                        "rkv": share_config("rkv", kv_budget=0.5),
                        "rkv16": share_config("rkv", kv_budget=0.5, compress_interval=16)}.items():
        write_run(tmp_path, "gsm8k", name, share, full, 0.1)
    runs = {r["name"]: r for r in load_runs(tmp_path)}
    legend = plot_accuracy_vs_memory("gsm8k", list(runs.values()), tmp_path / "pareto.png")
    assert sorted(legend) == ["memshare", "memshare (stage1=embedding)", "rkv", "rkv (compress_interval=16)"]
    sweep = plot_threshold_sweep("gsm8k", [runs[n] for n in ("ms8", "emb6", "ms6")], tmp_path / "sweep.png")
    assert sweep == ["memshare: pass@1", "memshare: affected ratio",
                     "memshare (stage1=embedding): pass@1", "memshare (stage1=embedding): affected ratio"]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000 and (tmp_path / "sweep.png").stat().st_size > 10_000


def test_report_tables_and_plots_from_a_results_dir(tmp_path, capsys):
    full = [record(str(i), [i < 3]) for i in range(4)]
    write_run(tmp_path / "gsm8k", "gsm8k", "none", ShareConfig(), full, 0.0)
    write_run(tmp_path / "gsm8k", "gsm8k", "ms8", share_config("memshare"), full, 0.1)
    write_run(tmp_path / "gsm8k", "gsm8k", "ms6", share_config("memshare", block_threshold=0.6), full[:2], 0.2)
    write_run(tmp_path / "nested" / "aime", "aime", "h2o", share_config("h2o", kv_budget=0.5), full, 0.3)
    # Matched to ms8 (all 4 problems, 3 solved); solves only problem 0, so MemShare is 2 problems = 50 points ahead.
    write_run(tmp_path / "gsm8k", "gsm8k", "random", share_config("random", share_ratio=0.25),
              [record(str(i), [i < 1]) for i in range(4)], 0.1, matched_to="ms8")
    text = build_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    assert text.index("## aime") < text.index("## gsm8k")
    assert "| none | – | 75.0% ± 49.0% | – | – | 4 | 0.0% / 0.0% | 25.0% | 12.5 | 10 | 0.0% | 3 |" in text
    # Paired with dense on the 2 problems both ran (both correct): no difference.
    assert ("| memshare | step_threshold=0.9, block_threshold=0.6 | 100.0% ± 0.0% | +0.0% ± 0.0% | – | 2 of 4 | "
            "20.0% / 40.0% |") in text
    assert 1.96 * statistics.stdev([0.0, 1.0, 1.0, 0.0]) / 2 == pytest.approx(0.566, abs=5e-4)
    assert ("| random | share_ratio=0.25 (matched to ms8: 10.0% vs 10.0% memory saved) | 25.0% ± 49.0% | -50.0% ± "
            "56.6% | +50.0% ± 56.6% | 4 |" in text)
    assert text.index("block_threshold=0.6") < text.index("block_threshold=0.8")
    assert "| h2o | kv_budget=0.5 | 75.0% ± 49.0% | – | – | 4 | 30.0% / 60.0% |" in text  # no dense run for aime
    for png in ("gsm8k_accuracy_vs_memory.png", "gsm8k_threshold_sweep.png", "aime_accuracy_vs_memory.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"]({png})" in text
    assert not (tmp_path / "aime_threshold_sweep.png").exists()
    main(["report", str(tmp_path)])
    assert "| h2o | kv_budget=0.5 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "gsm8k" / "no-runs-here")])
    assert exit_info.value.code == 2


def test_load_warning_flags_starved_or_uneven_runs():
    def run(name: str, share: float | None, threads: float | None) -> dict:
        return {"name": name, "summary": {"cpu_share": share, "num_threads_mean": threads}}

    assert load_warning([run("none", 0.97, 2.0), run("memshare", 0.93, 2.0)]) is None
    assert load_warning([run("none", None, None)]) is None  # runs saved before CPU use was recorded
    starved = load_warning([run("none", 0.97, 2.0), run("memshare", 0.45, 2.0)])
    assert "cannot be trusted" in starved and "memshare got 45%" in starved and "none got" not in starved
    uneven = load_warning([run("none", 0.99, 2.0), run("memshare", 0.99, 1.0)])
    assert "none 2.0, memshare 1.0 threads" in uneven
