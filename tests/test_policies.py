"""Baselines in the same block pool: random sharing and the eviction policies (StreamingLLM, H2O, R-KV)."""

import time
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from memshare import EngineConfig, SamplingParams, share_config
from memshare.engine.llm_engine import LLMEngine
from memshare.eval.policies import matched, parse_policies

from .conftest import MODEL

LONG = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)


def make_engine(**share) -> LLMEngine:
    return LLMEngine(EngineConfig(model=MODEL, kv_cache_memory="64MiB", log_stats_interval=0,
                                  share=share_config(**share)))


def check_ref_counts(engine: LLMEngine) -> None:
    refs = Counter(b for seq in engine.scheduler.running for b in seq.block_table)
    assert all(block.ref_cnt == refs[block.block_id] for block in engine.block_manager.blocks)


def run_checked(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, budget: int, slack: int = 0):
    """Step to completion; after each step every decoding sequence holds at most budget (+ slack) generated
    entries, the entry being written survived, and ref counts equal table references. Returns max entries."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    most = 0
    while engine.has_unfinished_requests():
        last = {seq.seq_id: seq.block_table[-1] for seq in engine.scheduler.running if seq.block_table}
        engine.step()
        check_ref_counts(engine)
        for seq in engine.scheduler.running:
            if seq.seq_id in last:
                assert last[seq.seq_id] in seq.block_table, "evicted the block being written"
            if seq.num_computed_tokens == seq.num_tokens - 1:
                generated = len(seq.block_table) - engine.policy.first_generated_block(seq)
                assert generated <= budget + slack
                most = max(most, generated)
    assert engine.block_manager.num_used_blocks == 0 and not engine.policy.states
    return most


@pytest.mark.parametrize("policy", ["streamingllm", "h2o"])
def test_eviction_keeps_exactly_its_budget(policy, prompts):
    engine = make_engine(policy=policy, kv_budget=3)
    assert run_checked(engine, prompts[:3], LONG, budget=3) == 3
    stats = engine.get_stats()
    assert stats["blocks_evicted"] >= 3 * (96 // 16 - 3 - 1)  # 96 tokens fill 5-6 generated blocks
    assert stats["affected_ratio"] == stats["blocks_evicted"] / engine.policy.generated_blocks
    assert stats["memory_saved_peak"] > 0


def test_rkv_compresses_every_interval_to_its_budget(prompts):
    engine = make_engine(policy="rkv", kv_budget=2, compress_interval=32)
    # Between compressions it grows by 32 tokens: two blocks, three when the kept last block was partial.
    assert run_checked(engine, prompts[:2], LONG, budget=2, slack=3) > 2
    assert engine.get_stats()["blocks_evicted"] > 0


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_remap_shares_given_up_blocks_with_earlier_kept_ones(prompts, threshold):
    """R-KV with remap: same budget of owned blocks; a given-up block becomes an entry pointing at an earlier kept
    block (threshold 0: always, as the prompt is always an earlier kept block) or is evicted (above 1: never)."""
    engine = LLMEngine(EngineConfig(model=MODEL, num_kv_blocks=16, max_model_len=192, log_stats_interval=0,
                                    share=share_config("rkv", kv_budget=2, compress_interval=16,
                                                       remap_threshold=threshold)))
    for i, ids in enumerate(prompts[:4]):
        engine.add_request(str(i), ids, LONG)
    share, pairs = engine.block_manager.share, []

    def recording_share(seq, index, source_index):
        pairs.append((index, source_index))
        return share(seq, index, source_index)

    engine.block_manager.share = recording_share
    cache = engine.block_manager.kv_cache.layers[0][0].codes
    while engine.has_unfinished_requests():
        before = cache.clone()
        written = {(seq.seq_id, seq.num_preemptions): set(seq.block_table[: seq.num_cached_kv_tokens // 16])
                   for seq in engine.scheduler.running}
        engine.step()
        check_ref_counts(engine)
        for seq in engine.scheduler.running:
            holder: dict[int, int] = {}
            for i, block_id in enumerate(seq.block_table):
                holder.setdefault(block_id, i)
            first = engine.policy.first_generated_block(seq)
            owned = [i for i in range(first, len(seq.block_table)) if holder[seq.block_table[i]] == i]
            if seq.num_computed_tokens == seq.num_tokens - 1:
                assert len(owned) <= 2 + 2  # the budget, plus up to 16 tokens (two partial blocks) between rounds
            # Zero-copy: a block written before the step and still in the table holds the same KV.
            kept = sorted(written.get((seq.seq_id, seq.num_preemptions), set()) & set(seq.block_table))
            assert torch.equal(cache[kept], before[kept])
    stats = engine.get_stats()
    assert engine.block_manager.num_used_blocks == 0 and not engine.policy.states
    assert stats["num_preemptions"] > 0
    assert all(source < index for index, source in pairs)  # never itself, never a later entry
    if threshold == 0:
        assert stats["blocks_shared"] == len(pairs) > 8 and stats["blocks_evicted"] == 0
    else:
        assert stats["blocks_shared"] == 0 and stats["blocks_evicted"] > 8


def test_fractional_budget_keeps_that_share_of_generated_blocks(prompts):
    engine = make_engine(policy="h2o", kv_budget=0.5)
    engine.add_request("0", prompts[0], LONG)
    while engine.has_unfinished_requests():
        engine.step()
    assert 0.35 <= engine.get_stats()["affected_ratio"] <= 0.55  # ceil(half) of the generated blocks kept


def test_sharing_time_includes_observing_queries(prompts, monkeypatch):
    engine = make_engine(policy="h2o", kv_budget=0.5)
    observe, calls = engine.policy.observe, []

    def slow_observe(seq, query):
        calls.append(seq.seq_id)
        time.sleep(0.01)
        observe(seq, query)

    monkeypatch.setattr(engine.policy, "observe", slow_observe)
    engine.add_request("0", prompts[0], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert len(calls) >= 31 and engine.get_stats()["sharing_time_s"] >= 0.01 * len(calls)


def test_evicted_tokens_are_masked_and_positions_kept(model_dir, prompts):
    """StreamingLLM's greedy tokens equal HF's with, per query, the tokens evicted before it masked out.

    Cached tokens keep the KV computed while they could still see now-evicted tokens, so the reference is one
    forward pass with a per-query (4D) mask, positions unchanged.
    """
    engine = make_engine(policy="streamingllm", kv_budget=1)
    engine.add_request("0", prompts[0], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    seq = engine.sequences("0")[0]
    total = seq.num_prompt_tokens + 64
    visible = torch.ones(total, total).tril().bool()
    while engine.has_unfinished_requests():
        state = engine.policy.states.get(seq.seq_id)
        query = seq.num_tokens - 1
        if state:  # entries the policy kept, plus anything appended to the table since
            kept = [p for start in state.positions for p in range(start, start + 16)]
            visible[query] = False
            visible[query, [p for p in kept if p <= query] + list(range(max(kept) + 1, query + 1))] = True
        engine.step()
    assert engine.policy.blocks_evicted >= 3 and not visible[-2, seq.num_prompt_tokens + 16]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokens = torch.tensor([seq.token_ids[:-1]])
    with torch.inference_mode():
        logits = model(tokens, attention_mask=visible[:-1, :-1][None, None],
                       position_ids=torch.arange(total - 1).unsqueeze(0)).logits[0]
    expected = logits[seq.num_prompt_tokens - 1 :].argmax(-1).tolist()
    assert expected == seq.output_token_ids


def test_random_sharing_reproduces_the_requested_ratio(prompts):
    engine = make_engine(policy="random", share_ratio=0.25, seed=3)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for i, ids in enumerate(prompts * 2):
        engine.add_request(str(i), ids, params)
    while engine.has_unfinished_requests():
        engine.step()
        check_ref_counts(engine)
        for seq in engine.scheduler.running:  # only generated blocks, only with an earlier entry
            first = engine.policy.first_generated_block(seq)
            assert len(set(seq.block_table[:first])) == first
    stats = engine.get_stats()
    assert stats["blocks_shared"] > 20
    assert abs(stats["affected_ratio"] - 0.25) <= 0.02
    assert engine.block_manager.num_used_blocks == 0


def test_policy_specs_parse_and_match():
    none, mem, rand, h2o = parse_policies("none,memshare:block_threshold=0.61:stage1=lsh,random:share_ratio=memshare,"
                                          "h2o:kv_budget=memshare:recent_fraction=0.25")
    assert mem.share.block_threshold == 0.61 and mem.share.stage1 == "lsh" and mem.label.startswith("memshare(")
    assert matched(rand, 0.2).share_ratio == 0.2 and rand.label == "random(share_ratio=memshare)"
    assert matched(h2o, 0.2).kv_budget == pytest.approx(0.8) and h2o.share.recent_fraction == 0.25
    assert none.label == "none"
    for bad, message in (("dense", "unknown policy"), ("h2o:budget=3", "bad override"),
                         ("h2o:kv_budget=x", "bad value"), ("h2o:kv_budget=1.5", "whole"), ("", "no policy")):
        with pytest.raises(ValueError, match=message):
            parse_policies(bad)


@pytest.mark.parametrize("field, value", [("share_ratio", 1.5), ("kv_budget", 0), ("kv_budget", 2.5),
                                          ("recent_fraction", -0.1), ("compress_interval", 0),
                                          ("stage2", "manhattan"), ("stage1", "tfidf"), ("remap_threshold", -1),
                                          ("remap_threshold", "0.5")])
def test_share_config_rejects_bad_baseline_parameters(field, value):
    policy = {"share_ratio": "random", "recent_fraction": "h2o", "compress_interval": "rkv",
              "remap_threshold": "streamingllm"}.get(field, "memshare")
    with pytest.raises(ValueError, match=field):
        share_config("h2o" if field == "kv_budget" else policy, **{field: value})
