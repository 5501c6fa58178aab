"""The bench and fidelity commands: serving metrics under a KV budget, and teacher-forced KL against dense."""

import json

import pytest
import torch

from memshare.config import share_config
from memshare.entrypoints.cli import main
from memshare.eval.datasets import Problem
from memshare.eval.fidelity import REVERIFY, load_traces, make_trace, method, run_fidelity
from memshare.eval.policies import parse_policies, share_for

from .conftest import MODEL
from .test_sharing import PASSAGE


@pytest.fixture(autouse=True)
def one_thread():
    # The engine sets torch's thread count process-wide; one thread also avoids OpenMP spin on a busy machine.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_reports_percentiles_preemptions_and_plot(tmp_path, capsys):
    main(["bench", "--model", MODEL, "--num-requests", "4", "--max-tokens", "24", "--num-kv-blocks", "14",
          "--num-threads", "1", "--policies", "none,memshare", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| none | " in printed and "| memshare(" in printed
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["label"] for r in results] == ["none", "memshare(step_threshold=0.9, block_threshold=0.8)"]
    for r in results:
        for metric in ("ttft_s", "tpot_s"):
            p = r[metric]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"]
        assert r["num_requests"] == 4 and 4 <= r["output_tokens"] <= 96 and r["output_tokens_per_s"] > 0
        assert r["kv_history"] and r["kv_blocks_mean"] <= r["kv_blocks_peak"] <= 14
    # 4 prompts of 76-116 tokens growing by 24 do not fit 14 blocks together.
    assert results[0]["num_preemptions"] > 0
    assert (tmp_path / "bench_kv_blocks.png").stat().st_size > 10_000


def test_matched_policy_needs_a_memshare_run_before_it():
    spec = parse_policies("random:share_ratio=memshare")[0]
    with pytest.raises(ValueError, match="memshare policy listed before"):
        share_for(spec, None)
    assert share_for(spec, 0.25).share_ratio == 0.25


def test_method_names_the_stage_choices_a_sweep_keeps_fixed():
    memshare = share_config("memshare", block_threshold=0.5).to_dict()
    assert method(memshare) == "memshare"
    assert method(memshare | {"stage1": "minilm", "stage2": "cosine"}) == "memshare(stage1=minilm, stage2=cosine)"
    assert method(share_config("h2o", kv_budget=8).to_dict()) == "h2o"


def test_fidelity_of_dense_against_dense_is_exact(tmp_path, capsys, tokenizer):
    main(["fidelity", "--model", MODEL, "--num-traces", "2", "--max-tokens", "48", "--num-threads", "1",
          "--policies", "none", "--out", str(tmp_path)])
    assert "| none | - |" in capsys.readouterr().out
    [result] = json.loads((tmp_path / "fidelity.json").read_text())
    assert result["tokens"] == sum(len(t["kl"]) for t in result["traces"]) and result["tokens_affected"] == 0
    traces = load_traces(tokenizer, 2, 48)
    assert [(t["trace_id"], len(t["kl"])) for t in result["traces"]] == [(t.trace_id, len(t.token_ids)) for t in traces]
    for trace in result["traces"]:
        assert trace["first_affected"] is None and max(trace["kl"]) < 1e-6 and all(trace["top1"])
    assert result["kl_all"] < 1e-6 and result["top1_all"] == 1.0
    for name in ("fidelity.png", "fidelity_kl_vs_similarity.png", "fidelity_kl_vs_memory.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_fidelity_of_memshare_diverges_only_after_its_first_share(tokenizer):
    trace = make_trace(tokenizer, Problem("repeat", "Copy the passage twice.", ""), PASSAGE.strip(), 400)
    assert tokenizer.decode(trace.token_ids).count(REVERIFY.strip()) == 1
    memshare, random = run_fidelity(MODEL, parse_policies("memshare:block_threshold=0:step_threshold=0,"
                                                          "random:share_ratio=memshare"), [trace], num_threads=1)
    [result] = memshare.traces
    assert result.first_affected is not None and len(result.kl) == len(trace.token_ids)
    # Until the first share both engines run the same KV: identical distributions.
    assert max(result.kl[: result.first_affected]) < 1e-6
    assert sum(result.affected_kl) / len(result.affected_kl) > 1e-4
    assert len(result.share_similarities) == memshare.stats["blocks_shared"] > 0
    assert all(-1 <= s <= 1 for s in result.share_similarities)
    assert memshare.summary()["kl_affected"] > 0 and memshare.summary()["top1_affected"] <= 1
    assert random.share["share_ratio"] == memshare.stats["affected_ratio"] > 0
