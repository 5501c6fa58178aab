"""MemShare: the two filters, zero-copy sharing, and composition with the engine's features."""

from collections import Counter

import pytest
import torch

from memshare import LLM, EngineConfig, MemShareConfig, SamplingParams, share_config
from memshare.sharing.stage1 import LSHStepIndex, StepIndex, cosine
from memshare.sharing.stage2 import block_similarity, combine, partial_sums, similarity
from memshare.sharing.steps import SplitState, StepSplitter
from memshare.vllm_plugin.kv_layout import owns_kv_heads

from .conftest import MODEL
from .test_engine import GREEDY, token_ids

PASSAGE = ("The river flows past the old mill every spring, carrying leaves and small branches down to the sea, "
           "where the fishermen wait for the tide to turn before they row out to the nets.\n\n")
REPEAT = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def reference_similarity(qk, qv, k, v) -> torch.Tensor:
    """Slow float64 loops over query blocks, blocks and layers."""
    out = torch.zeros(qk.shape[1], k.shape[1], dtype=torch.float64)
    for i in range(qk.shape[1]):
        for j in range(k.shape[1]):
            total = 0.0
            for layer in range(qk.shape[0]):
                for x, y in ((qk[layer, i], k[layer, j]), (qv[layer, i], v[layer, j])):
                    x, y = x.double().flatten(), y.double().flatten()
                    total += (1 - (x - y).norm() / (x.norm() + y.norm())) / 2
            out[i, j] = total / qk.shape[0]
    return out


def test_stage2_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    qk, qv = torch.randn(2, 3, 5, 4, 2, 8, generator=gen).unbind(0)
    k, v = torch.randn(2, 3, 7, 4, 2, 8, generator=gen).unbind(0)
    k[:, 2] = qk[:, 1]  # an exact repeat scores 1
    v[:, 2] = qv[:, 1]
    v[:, 4] = qv[:, 0] * 1.05  # a near repeat scores close to 1
    k[:, 4] = qk[:, 0]
    got = block_similarity(qk, qv, k, v)
    torch.testing.assert_close(got.double(), reference_similarity(qk, qv, k, v), atol=1e-5, rtol=0)
    assert got[1, 2] == pytest.approx(1.0, abs=1e-6)
    assert got[0, 4] > 0.98 and got[0, 0] < 0.8


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_partial_sums_over_split_heads_layers_and_replicas_combine_to_the_full_score(metric):
    """Tensor parallelism splits the KV heads, pipeline stages the layers; with more ranks than KV heads a head is on
    several ranks and must count once. Each way, the ranks' sums combine to the score of the whole cache."""
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 4, 6, 8, 4, 16, generator=gen).unbind(0)  # [layers, blocks, bs, heads, dim]
    names = [f"layers.{i}" for i in range(4)]

    def sums(layers: slice, heads: slice):
        k, v = keys[layers, :, :, heads], values[layers, :, :, heads]
        return partial_sums(k[:, :2], v[:, :2], k[:, 2:], v[:, 2:], metric, names[layers])

    full = similarity(sums(slice(None), slice(None)), metric)
    torch.testing.assert_close(full, block_similarity(keys[:, :2], values[:, :2], keys[:, 2:], values[:, 2:], metric))
    by_heads = combine([sums(slice(None), slice(0, 2)), sums(slice(None), slice(2, 4))])
    by_layers = combine([sums(slice(2, 4), slice(None)), sums(slice(0, 2), slice(None))])
    tp, per_rank = 8, [slice(h, h + 1) for h in range(4) for _ in range(2)]  # 8 ranks, each head on 2 of them
    replicated = combine([sums(slice(None), heads) for rank, heads in enumerate(per_rank)
                          if owns_kv_heads(rank, tp, total_kv_heads=4)])
    for parts in (by_heads, by_layers, replicated):
        torch.testing.assert_close(similarity(parts, metric), full, atol=1e-5, rtol=0)
    every_replica = combine([sums(slice(None), heads) for heads in per_rank])
    assert not torch.allclose(every_replica.cross, by_heads.cross)  # counting replicas twice would change the sums
    with pytest.raises(ValueError, match="no partial sums"):
        combine([])


def test_stage1_cosine_candidates_best_first_and_capped():
    index = StepIndex(MemShareConfig(step_threshold=0.9, max_candidate_steps=2))
    base = Counter({1: 3, 2: 2, 3: 1})
    assert cosine(base, base) == pytest.approx(1.0)
    assert cosine(base, Counter({7: 1})) == 0.0
    for bag in (Counter({7: 4}), Counter({1: 3, 2: 2, 3: 1, 4: 1}), base, Counter({1: 3, 2: 2})):
        index.add(bag)
    hits = index.candidates(base)
    assert [i for i, _ in hits] == [2, 1]  # cosines 1.0, 0.966; step 3 (0.964) passes but is over the cap
    assert hits[0][1] == pytest.approx(1.0) and hits[1][1] == pytest.approx(14 / (14 * 15) ** 0.5)
    index.max_candidates = 8
    assert [i for i, _ in index.candidates(base)] == [2, 1, 3]


def test_lsh_stage1_finds_near_duplicates_without_scoring_every_step():
    config = MemShareConfig(stage1="lsh", step_threshold=0.9)
    index, exact = LSHStepIndex(config), StepIndex(config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        bag = Counter(torch.randint(0, 5000, (40,), generator=gen).tolist())
        index.add(bag)
        exact.add(bag)
    target = Counter(torch.randint(0, 5000, (40,), generator=gen).tolist())
    index.add(target)
    exact.add(target)
    near = target + Counter({target.most_common(1)[0][0]: 1})
    assert [i for i, _ in index.candidates(near)] == [i for i, _ in exact.candidates(near)] == [200]
    assert len(index._pool(near)) < 50


def test_step_splitter_blank_lines_cues_and_min_length(tokenizer):
    text = ("First we add the two numbers to get the total amount.\n\n"
            "Then we multiply by three to find the answer to the question.\n"
            "Wait, let me check the multiplication again carefully.\nOk.\n\nDone")
    ids = tokenizer.encode(text)
    splitter = StepSplitter(MemShareConfig(min_step_tokens=4), lambda t: tokenizer.decode([t]))
    state = SplitState(0)
    ends = [e for p, t in enumerate(ids) if (e := splitter.push(state, p, t)) is not None]
    steps = [tokenizer.decode(ids[a:b]) for a, b in zip([0, *ends], ends)]
    assert steps[0].endswith("total amount.\n\n")
    assert steps[1].startswith("Then") and steps[1].endswith("question.\n")
    assert steps[2].startswith("Wait") and steps[2].endswith("Ok.\n\n")  # "Ok." alone is too short a step
    long_only = StepSplitter(MemShareConfig(min_step_tokens=100), lambda t: tokenizer.decode([t]))
    state = SplitState(0)
    assert all(long_only.push(state, p, t) is None for p, t in enumerate(ids))


def test_share_config_rejects_bad_values():
    for kwargs in ({"policy": "copy"}, {"policy": "memshare", "kv_budget": 3}, {"stage1": "bert"},
                   {"step_threshold": -0.1}, {"block_threshold": float("nan")}, {"min_step_tokens": 0},
                   {"max_candidate_steps": 0}):
        with pytest.raises(ValueError):
            share_config(**{"policy": "memshare"} | kwargs)
    with pytest.raises(TypeError, match="ShareConfig"):
        EngineConfig(share="memshare")


@pytest.fixture(scope="module")
def sharing_llm() -> LLM:
    return LLM(model=MODEL, num_kv_blocks=96, log_stats_interval=0, share=share_config("memshare"))


def test_unrotated_keys_of_a_repeat_match_at_layer_zero(sharing_llm, tokenizer):
    engine = sharing_llm.llm_engine
    passage = tokenizer.encode(PASSAGE)[:32]
    engine.add_request("rope", passage * 2, SamplingParams(max_tokens=4))
    engine.step()
    seq = engine.sequences("rope")[0]
    keys, values = engine.block_manager.read_kv(seq.block_table[:4])
    positions = torch.arange(64)
    unrotated = engine.model_runner.unrotate_keys(keys.flatten(1, 2), positions).view_as(keys)
    # Layer 0 sees only the token: with RoPE undone, the repeat's keys and values equal the original's.
    torch.testing.assert_close(unrotated[0, 2:], unrotated[0, :2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values[0, 2:], values[0, :2])
    assert not torch.allclose(keys[0, 2:], keys[0, :2], atol=1e-2)
    engine.abort_request("rope")
    assert engine.block_manager.num_used_blocks == 0


def test_sharing_is_zero_copy_and_points_earlier(sharing_llm, monkeypatch):
    engine = sharing_llm.llm_engine
    bm, policy = engine.block_manager, engine.policy
    shares: list[tuple[int, int]] = []
    real_share, real_after_step = bm.share, policy.after_step

    def share(seq, index, source_index):
        assert index >= policy.first_generated_block(seq) and (index + 1) * bm.block_size <= seq.num_computed_tokens
        duplicate = seq.block_table[index]
        target = real_share(seq, index, source_index)
        assert seq.block_table[index] == seq.block_table[source_index] == target != duplicate
        shares.append((index, source_index))
        return target

    def after_step(running):
        planes = [plane.codes for layer in bm.kv_cache.layers for plane in layer]
        before = [codes.clone() for codes in planes]
        real_after_step(running)
        assert all(torch.equal(codes, saved) for codes, saved in zip(planes, before))

    monkeypatch.setattr(bm, "share", share)
    monkeypatch.setattr(policy, "after_step", after_step)
    shared_before = policy.blocks_shared
    first = sharing_llm.generate(PASSAGE * 2, REPEAT, use_tqdm=False)[0]
    assert shares and policy.blocks_shared - shared_before == len(shares)
    assert all(source < index for index, source in shares)
    assert bm.num_used_blocks == 0 and all(b.ref_cnt == 0 for b in bm.blocks)
    # Prefix-cache hashes stay truthful: the same prompt again hits the cache and reproduces the output.
    hits_before = bm.prefix_hits
    again = sharing_llm.generate(PASSAGE * 2, REPEAT, use_tqdm=False)[0]
    assert bm.prefix_hits > hits_before and again.outputs[0].token_ids == first.outputs[0].token_ids
    stats = sharing_llm.stats()
    assert 0 < stats["affected_ratio"] <= 1 and stats["memory_saved_mean"] > 0 and stats["sharing_time_s"] > 0


def test_thresholds_above_one_never_share_and_keep_dense_tokens(prompts, hf_greedy):
    llm = LLM(model=MODEL, num_kv_blocks=96, log_stats_interval=0,
              share=share_config("memshare", step_threshold=0.0, block_threshold=1.01))
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == hf_greedy
    repeat = llm.generate(PASSAGE * 2, REPEAT, use_tqdm=False)[0]
    stats = llm.stats()
    assert stats["stage2_pairs"] > 0 and stats["blocks_shared"] == 0 and stats["memory_saved_peak"] == 0
    dense = LLM(model=MODEL, num_kv_blocks=96, log_stats_interval=0)
    assert dense.generate(PASSAGE * 2, REPEAT, use_tqdm=False)[0].outputs[0].token_ids == repeat.outputs[0].token_ids


def check_ref_counts(engine) -> None:
    refs = Counter(b for seq in engine.scheduler.running for b in seq.block_table)
    assert all(block.ref_cnt == refs[block.block_id] for block in engine.block_manager.blocks)


def test_sharing_composes_with_preemption_n_and_abort(tokenizer):
    llm = LLM(model=MODEL, num_kv_blocks=36, max_model_len=320, log_stats_interval=0,
              share=share_config("memshare", step_threshold=0.5, block_threshold=0.6, min_step_tokens=8))
    engine = llm.llm_engine
    real_after_step = engine.policy.after_step
    shared_after_preemption = []

    def after_step(running):
        real_after_step(running)
        check_ref_counts(engine)
        shared_after_preemption.extend(s.seq_id for s in running if s.num_preemptions and
                                       len(set(s.block_table)) < len(s.block_table))

    engine.policy.after_step = after_step
    params = SamplingParams(n=2, temperature=0, max_tokens=150, ignore_eos=True)
    # Admitted last, preempted first: the repetitive prompts are recomputed and must share again.
    prompts = [PASSAGE * 2, "Q: What is 2+2?\nA: 4\n\nQ: What is 3+3?\nA: 6\n\nQ: What is 4+4?\nA: 8\n\n",
               "Hello world.\n\nHello world.\n\nHello world.\n\n"]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.stats()
    assert [len(o.outputs) for o in outputs] == [2, 2, 2]
    assert all(len(c.token_ids) == 150 for o in outputs for c in o.outputs)
    assert stats["num_preemptions"] > 0 and stats["blocks_shared"] > 0 and shared_after_preemption
    assert engine.block_manager.num_used_blocks == 0

    engine.add_request("abort-me", tokenizer.encode(PASSAGE * 2), REPEAT)
    while engine.policy.blocks_shared == stats["blocks_shared"]:
        engine.step()
    engine.abort_request("abort-me")
    assert engine.block_manager.num_used_blocks == 0 and all(b.ref_cnt == 0 for b in engine.block_manager.blocks)
    assert engine.policy.states == {}
