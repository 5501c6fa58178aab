"""Datasets, grading, calibration and the demo / calibrate command lines."""

import json

import pytest

from memshare.entrypoints.cli import main
from memshare.eval.calibrate import probe_tokens, propose_threshold
from memshare.eval.datasets import load_problems
from memshare.eval.grading import is_correct

from .conftest import MODEL


@pytest.mark.parametrize(("output", "answer", "expected"), [
    ("so she makes \\boxed{18} dollars", "18", True),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{17}", "18", False),
    ("I do not know.", "18", False),
])
def test_grading_known_pairs(output, answer, expected):
    assert is_correct(output, answer) is expected


def test_load_builtin_and_jsonl_datasets(tmp_path):
    gsm8k = load_problems("gsm8k", limit=3)
    assert len(gsm8k) == 3 and gsm8k[0].answer == "18" and "ducks" in gsm8k[0].question
    assert load_problems("math500", limit=1)[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"q": "1+1?", "a": 2}) + "\n" + json.dumps({"q": "2+2?"}) + "\n")
    assert load_problems(str(path), limit=1, problem_field="q", answer_field="a")[0].answer == "2"
    with pytest.raises(KeyError, match="aime.jsonl:2"):
        load_problems(str(path), problem_field="q", answer_field="a")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_problems("aime24")


def test_probe_copies_are_block_aligned_and_threshold_meets_the_false_share_target():
    tokens, shift = probe_tokens([1] * 21, list(range(100, 137)), 0, 16)
    assert shift % 16 == 0 and tokens[21 + shift:] == list(range(100, 137)) == tokens[21:58]
    unrelated = [i / 100 for i in range(100)]  # uniform on [0, 0.99]
    threshold, false_share, recall = propose_threshold(unrelated, [0.9, 0.95, 0.97, 0.5], max_false_share=0.05)
    assert threshold == 0.95 and false_share <= 0.05 and recall == 0.5


@pytest.mark.parametrize("stage2", ["euclidean", "cosine"])
def test_calibrate_separates_repeats_from_unrelated_blocks(tmp_path, capsys, stage2):
    out = tmp_path / "calibration.json"
    main(["calibrate", "--model", MODEL, "--num-problems", "3", "--max-tokens", "96", "--kv-cache-memory", "128MiB",
          "--json", str(out), "--stage2", stage2])
    assert "proposed block_threshold" in capsys.readouterr().out
    result = json.loads(out.read_text())
    unrelated = sorted(result["unrelated_same_request"] + result["unrelated_other_requests"])
    repeats = sorted(result["repeats"])
    assert len(repeats) >= 10 and len(unrelated) >= 10
    assert repeats[len(repeats) // 2] > unrelated[int(0.9 * len(unrelated))]
    assert 0 < result["block_threshold"] <= 1 and result["false_share_rate"] <= 0.01


def test_demo_forces_the_same_tokens_dense_and_memshare_under_a_tight_budget(tmp_path, capsys):
    main(["demo", "--model", MODEL, "--num-traces", "3", "--max-tokens", "48", "--num-kv-blocks", "16",
          "--step-thresholds", "0.5", "--block-thresholds", "0.5", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| none |" in printed and "| memshare |" in printed and "a sampled answer" in printed
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/*.summary.json"))]
    assert sorted(s["policy"] for s in summaries) == ["memshare", "none"]
    assert all(s["tokens_match"] and s["output_tokens"] == 3 * 48 for s in summaries)
    dense = next(s for s in summaries if s["policy"] == "none")
    assert dense["num_preemptions"] > 0
    assert next(s for s in summaries if s["policy"] == "memshare")["kl"] is not None
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*_batch_kv.png"))
    assert (tmp_path / "report.md").exists()


def test_generate_cli_with_sharing(capsys):
    main(["generate", "--model", MODEL, "--raw", "--max-tokens", "8", "--share", "memshare", "--step-threshold",
          "0.5", "--json", "Hello"])
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0])["finish_reason"] in ("length", "stop")
    assert json.loads(captured.err.strip().splitlines()[-1])["share_policy"] == "memshare"
    with pytest.raises(SystemExit):
        main(["generate", "--share", "copy", "Hello"])
