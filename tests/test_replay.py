"""Forced decoding in the engine and `memshare replay` (same tokens for every policy, KL against dense, resume)."""

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from memshare import EngineConfig, PromptTooLongError, SamplingParams, share_config
from memshare.engine.llm_engine import LLMEngine
from memshare.eval import policies
from memshare.eval.harness import plan_runs
from memshare.eval.policies import expand_sweep, parse_policies, parse_sweep
from memshare.eval.replay import TraceFileError, read_trace_file
from memshare.eval.report import kl_crossings, read_records, replay_levels

from .conftest import MODEL
from .test_sharing import PASSAGE

POLICIES = {"none": {}, "memshare": {"step_threshold": 0.3, "block_threshold": 0.3},
            "random": {"share_ratio": 0.5}, "streamingllm": {"kv_budget": 4}, "h2o": {"kv_budget": 4},
            "rkv": {"kv_budget": 4, "compress_interval": 16}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def forced(tokenizer) -> list[list[int]]:
    """Repeated passages (so MemShare shares), different per request so each has its own trace."""
    words = PASSAGE.split()
    return [tokenizer.encode((" ".join(words[i:] + words[:i]) + "\n\n") * 4, add_special_tokens=False)[:112]
            for i in range(4)]


def check_ref_counts(engine: LLMEngine) -> None:
    refs = Counter(b for seq in engine.scheduler.running for b in seq.block_table)
    assert all(block.ref_cnt == refs[block.block_id] for block in engine.block_manager.blocks)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_forced_tokens_come_out_exactly_under_preemption_and_every_policy(policy, prompts, forced):
    # 22 blocks cannot hold four 150-token sequences (8-10 blocks each, eviction keeping 8): the youngest are
    # preempted and recomputed.
    engine = LLMEngine(EngineConfig(model=MODEL, num_kv_blocks=22, log_stats_interval=0, num_threads=1,
                                    share=share_config(policy, **POLICIES[policy])))
    for i, ids in enumerate(forced):
        # The same prompt twice: the second request hits the first one's prefix-cached prompt blocks.
        params = SamplingParams(temperature=0.8, seed=i, logprobs=0, max_tokens=None, forced_token_ids=ids,
                                ignore_eos=True)
        engine.add_request(str(i), prompts[i // 2], params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o for o in engine.step()}
        check_ref_counts(engine)
    stats = engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["num_recomputed_tokens"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_used"] == 0
    for i, ids in enumerate(forced):
        out = outputs[str(i)].outputs[0]
        assert out.token_ids == ids and out.finish_reason == "length"
        assert [next(iter(entry)) for entry in out.logprobs] == ids  # the forced token's own logprob, first
    if policy == "memshare":
        assert stats["blocks_shared"] > 0
    elif policy != "none":
        assert stats["affected_ratio"] > 0


def test_forced_logprobs_equal_transformers(model_dir, prompts, forced):
    engine = LLMEngine(EngineConfig(model=MODEL, num_kv_blocks=64, log_stats_interval=0, num_threads=1))
    engine.add_request("0", prompts[0], SamplingParams(temperature=0, logprobs=0, max_tokens=None,
                                                          forced_token_ids=forced[0]))
    out = None
    while engine.has_unfinished_requests():
        out = next(iter(engine.step()), out)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompts[0] + forced[0]])
    with torch.inference_mode():
        logprobs = model(ids).logits[0, len(prompts[0]) - 1:-1].log_softmax(-1)
    expected = logprobs.gather(1, torch.tensor(forced[0]).unsqueeze(1)).squeeze(1)
    got = torch.tensor([entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, forced[0])])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_logits_processors_see_outputs_and_steer_sampling(llm, prompts):
    seen: list[int] = []

    def ban_first_choice(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(len(output_ids))
        logits[banned] = float("-inf")
        return logits

    free = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=6),
                        use_tqdm=False)[0].outputs[0].token_ids
    banned = free[0]
    steered = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(
        temperature=0, max_tokens=6, logits_processors=[ban_first_choice]), use_tqdm=False)[0].outputs[0].token_ids
    assert seen == list(range(6)) and banned not in steered


def test_bad_forced_tokens_raise_before_anything_is_queued(llm, prompts):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="forced_token_ids"):
        SamplingParams(forced_token_ids=[])
    with pytest.raises(ValueError, match="forced_token_ids"):
        SamplingParams(forced_token_ids=[1, -2])
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["not callable"])
    with pytest.raises(ValueError, match="forced token ids must be in"):
        llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(forced_token_ids=[10**7]))
    with pytest.raises(PromptTooLongError, match="forced tokens"):
        llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(forced_token_ids=[1] * engine.max_model_len))
    assert not engine.has_unfinished_requests()


def write_traces(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, message", [
    ("{not json", r":2: not JSON"),
    ([1, 2], r":2: a trace must be a JSON object"),
    ({"answer": "x", "response": "y"}, r":2: no prompt field \(prompt / question / messages\)"),
    ({"question": "q"}, r":2: no response field 'response'"),
    ({"question": "q", "response": "  "}, r":2: response 'response' is empty"),
    ({"messages": [{"role": "user"}], "response": "y"}, r":2: 'messages' must be non-empty text or a list"),
])
def test_bad_trace_files_name_the_line(tmp_path, line, message):
    path = write_traces(tmp_path / "t.jsonl", [{"question": "q", "response": "r"}, line])
    with pytest.raises(TraceFileError, match=message):
        read_trace_file(path)


def test_trace_fields_and_messages(tmp_path):
    path = write_traces(tmp_path / "t.jsonl", [
        {"id": "a", "prompt": "p", "question": "ignored", "response": "r"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "response": "r2"},
        {"q": "custom", "out": "r3", "response": "r"}])
    rows = read_trace_file(path, limit=2)
    assert [(r.trace_id, r.prompt, r.response) for r in rows] == [
        ("a", "p", "r"), ("2", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "r2")]
    with pytest.raises(TraceFileError, match=":1: no prompt field \\(q\\)"):
        read_trace_file(path, prompt_field="q")
    with pytest.raises(FileNotFoundError):
        read_trace_file(tmp_path / "missing.jsonl")
    with pytest.raises(TraceFileError, match="trace ids repeat"):
        read_trace_file(write_traces(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "p", "response": "r"}] * 2))


def test_sweep_expands_level_by_level_and_runs_dense_once():
    specs = parse_policies("none,memshare,random:share_ratio=memshare,streamingllm")
    sweep = parse_sweep(["block_threshold=0.6,0.5", "kv_budget=4,8"])
    got = [(s.share.policy, getattr(s.share, "block_threshold", None), getattr(s.share, "kv_budget", None), s.match)
           for s in expand_sweep(specs, sweep)]
    assert got == [("none", None, None, ()), ("memshare", 0.6, None, ()), ("random", None, None, ("share_ratio",)),
                   ("streamingllm", None, 4, ()), ("memshare", 0.5, None, ()), ("random", None, None, ("share_ratio",)),
                   ("streamingllm", None, 8, ())]
    # A matched spec runs again only when its MemShare run changed.
    unchanged = expand_sweep(parse_policies("memshare,random:share_ratio=memshare,streamingllm"),
                             parse_sweep(["kv_budget=4,8"]))
    assert [s.share.policy for s in unchanged] == ["memshare", "random", "streamingllm", "streamingllm"]
    assert len(plan_runs(expand_sweep(specs, sweep), Path("out"))) == 7
    for bad in (["block_threshold=0.6", "kv_budget=4,8"], ["nonsense=1"], ["block_threshold="]):
        with pytest.raises(ValueError, match="sweep"):
            parse_sweep(bad)
    with pytest.raises(ValueError, match="level 1 for memshare"):
        expand_sweep(specs, parse_sweep(["block_threshold=-1"]))


def test_kl_crossings_interpolate_along_kv_bytes_saved():
    def run(policy: str, saved: float, kl: float, **summary: float) -> dict:
        share = {"policy": policy, "kv_budget": saved} if policy != "memshare" else {"policy": policy}
        return {"policy": policy, "config": {"share": share},
                "summary": {"memory_saved_mean": saved, "kl": kl, **summary}}

    runs = [run("memshare", 0.1, 0.01), run("memshare", 0.5, 0.09), run("h2o", 0.2, 0.06), run("rkv", 0.3, 0.02)]
    got = kl_crossings(runs, 0.05)  # runs saved before KV dtypes: their blocks were float32, so blocks are bytes
    assert got["memshare"].startswith("crosses 0.05 at about 30.0% of float32's KV bytes saved")
    assert got["h2o"].startswith("already 0.060") and got["rkv"].startswith("stays below 0.05 up to 30.0%")
    quantized = [run("memshare", 0.0, 0.01, kv_bytes_saved_vs_float32=0.75),
                 run("memshare", 0.2, 0.09, kv_bytes_saved_vs_float32=0.85)]
    assert kl_crossings(quantized, 0.05)["memshare"].startswith("crosses 0.05 at about 80.0% of float32's")


def test_replay_levels_group_matched_baselines_with_their_memshare_run():
    def run(name: str, policy: str, source: str | None = None) -> dict:
        return {"name": name, "policy": policy, "config": {"matched": {"memshare_run": source}} if source else {}}

    runs = [run("none", "none"), run("m1", "memshare"), run("r1", "rkv", "m1"), run("m2", "memshare"),
            run("h2", "h2o", "m2"), run("r2", "rkv", "m2"), run("s", "streamingllm")]
    got = {level: [r["name"] for r in members] for level, members in replay_levels(runs).items()}
    assert got == {"m1": ["m1", "r1"], "m2": ["m2", "h2", "r2"], "unmatched": ["s"]}


# Three traces of about 25 + 96 tokens (8 blocks each) in 18 blocks: dense preempts.
REPLAY = ["replay", "--model", MODEL, "--max-tokens", "96", "--num-kv-blocks", "18", "--num-threads", "1"]
STABLE = ("trace_id", "prompt_tokens", "forced_tokens", "output_tokens", "tokens_match", "kv_blocks_generated",
          "kv_blocks_affected", "kl_sum", "top1", "logprob_mean")


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    words = PASSAGE.split()
    lines = [{"id": f"t{i}", "question": f"Retell passage {i}.",
              "response": (" ".join(words[i:] + words[:i]) + "\n\n") * 3} for i in range(3)]
    return write_traces(tmp_path_factory.mktemp("traces") / "mini.jsonl", lines)


def test_replay_gives_every_policy_the_same_tokens_and_scores_against_dense(tmp_path, trace_file, capsys, monkeypatch):
    from memshare.entrypoints.cli import main

    monkeypatch.setattr(policies, "MAX_TRIES", 1)  # the search is tests/test_matching.py's: one try keeps it short

    main([*REPLAY, "--traces", str(trace_file), "--out", str(tmp_path), "--policies",
          "none,memshare:step_threshold=0.3:block_threshold=0.3,random:share_ratio=memshare,"
          "streamingllm:kv_budget=memshare,h2o:kv_budget=memshare,rkv:kv_budget=memshare:compress_interval=16"])
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "mini").glob("*.summary.json"))]
    assert len(summaries) == 6
    assert {s["output_tokens"] for s in summaries} == {288} and all(s["tokens_match"] for s in summaries)
    dense = next(s for s in summaries if s["policy"] == "none")
    assert dense["kl"] is None and dense["num_preemptions"] > 0 and dense["num_running_peak"] == 3
    assert all(s["num_threads_mean"] == 1 and s["cpu_share"] > 0 and s["num_steps"] > 0 for s in summaries)
    others = [s for s in summaries if s["policy"] != "none"]
    assert all(s["kl"] > 0 and 0 < s["top1"] <= 1 and s["affected_ratio"] > 0 for s in others)
    matched = [s for s in others if s["matched"]]
    assert len(matched) == 4 and all(len(s["matched"]["tries"]) == 1 for s in matched)
    report = (tmp_path / "report.md").read_text()
    assert "## replay: mini on smollm2-135m" in report and "| rkv |" in report and "KL 0.05" not in report
    assert "| engine steps |" in report
    assert (tmp_path / "mini_smollm2-135m_batch_kv.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def run_replay(out: Path, trace_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memshare.entrypoints.cli", *REPLAY, "--traces", str(trace_file),
                             "--max-num-seqs", "1", "--policies", "none,streamingllm:kv_budget=1", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def stable(path: Path) -> list[dict]:
    return [{k: r[k] for k in STABLE} for r in read_records(path)[0]]


def test_killed_replay_resumes_to_the_uninterrupted_result(tmp_path, trace_file):
    assert run_replay(tmp_path / "whole", trace_file).wait() == 0
    summary = tmp_path / "killed" / "mini" / "streamingllm_kv_budget=1.summary.json"
    proc = run_replay(tmp_path / "killed", trace_file)
    deadline = time.monotonic() + 300
    while not (summary.exists() and json.loads(summary.read_text())["num_traces"] >= 1):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert run_replay(tmp_path / "killed", trace_file).wait() == 0
    for name in ("none", "streamingllm_kv_budget=1"):
        whole, killed = (tmp_path / d / "mini" / f"{name}.jsonl" for d in ("whole", "killed"))
        assert stable(killed) == stable(whole)
    sessions = json.loads(summary.read_text())["sessions"]
    assert len(sessions) == 2 and sum(s["problems"] for s in sessions) == 3


def test_replay_runs_every_policy_at_every_kv_dtype_at_equal_bytes(tmp_path, trace_file, monkeypatch):
    """Dense at the model's dtype is the KL reference; each dtype's MemShare and its matched baseline run on the
    same tokens in the bytes of 18 float32 blocks; the report gives bytes saved and draws the front."""
    from memshare.entrypoints.cli import main

    monkeypatch.setattr(policies, "MAX_TRIES", 1)

    main([*REPLAY, "--traces", str(trace_file), "--out", str(tmp_path), "--kv-cache-dtype", "int8_per_token_head",
          "--policies", "none,memshare:step_threshold=0.3:block_threshold=0.3,streamingllm:kv_budget=memshare"])
    runs = {json.loads(p.read_text())["run"]: json.loads(p.read_text())
            for p in (tmp_path / "mini").glob("*.config.json")}
    int8 = "[int8_per_token_head]"
    assert sorted(runs) == sorted(["none", f"none {int8}", f"memshare(step_threshold=0.3, block_threshold=0.3) {int8}",
                                   f"streamingllm(kv_budget=memshare) {int8} vs memshare(step_threshold=0.3, "
                                   f"block_threshold=0.3) {int8}"])
    assert runs["none"]["engine"]["num_kv_blocks"] == 18 and runs["none"]["engine"]["kv_cache_dtype"] == "auto"
    float32_bytes = 18 * 16 * 30 * 3 * 64 * 2 * 4  # smollm2: 30 layers, 3 KV heads of 64
    quantized = [c["engine"] for name, c in runs.items() if name != "none"]
    assert all(e["num_kv_blocks"] is None and e["kv_cache_memory"] == float32_bytes for e in quantized)
    summaries = {s["run"]: s for s in (json.loads(p.read_text()) for p in (tmp_path / "mini").glob("*.summary.json"))}
    assert all(s["tokens_match"] and s["output_tokens"] == 288 for s in summaries.values())
    dense, dense_int8 = summaries["none"], summaries[f"none {int8}"]
    assert dense["kv_bytes_saved_vs_float32"] == 0 and dense["kv_bytes_saved_vs_bfloat16"] == -1
    # int8 codes with a float16 scale per 64 values: 1 - (64 + 2) / 256 of float32's bytes saved.
    assert dense_int8["kv_bytes_saved_vs_float32"] == pytest.approx(1 - 66 / 256)
    assert 0 < dense_int8["kl"] < 0.01 and dense_int8["num_preemptions"] < dense["num_preemptions"]
    matched = runs[next(n for n in runs if n.startswith("streamingllm"))]["matched"]
    assert matched["memshare_run"].endswith(int8)
    report = (tmp_path / "report.md").read_text()
    assert "| int8_per_token_head |" in report and "The front, the lowest KL" in report
