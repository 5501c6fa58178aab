"""Greedy tokens must equal Hugging Face transformers' generate, however the engine batches and pages."""

from memshare import LLM, SamplingParams
from memshare.engine.llm_engine import History

from .conftest import MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_hf_batched(llm, prompts, hf_greedy):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == hf_greedy
    assert [o.prompt_token_ids for o in outputs] == prompts


def test_greedy_matches_hf_one_by_one(llm, prompts, hf_greedy):
    for ids, expected in zip(prompts, hf_greedy):
        assert token_ids(llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)) == [expected]


def test_greedy_matches_hf_under_preemption(prompts, hf_greedy):
    llm = LLM(model=MODEL, num_kv_blocks=12, max_model_len=192, log_stats_interval=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_peak"] <= 12
    assert token_ids(outputs) == hf_greedy
    assert stats["kv_blocks_used"] == 0


def test_seeded_samples_survive_preemption(prompts):
    # A sample recomputed after preemption forks only the prompt of its sibling, never its generated blocks.
    params = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=48, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts[:4]]
    roomy = LLM(model=MODEL, num_kv_blocks=64, log_stats_interval=0).generate(batch, params, use_tqdm=False)
    tight = LLM(model=MODEL, num_kv_blocks=14, max_model_len=128, log_stats_interval=0)
    outputs = tight.generate(batch, params, use_tqdm=False)
    assert tight.stats()["num_preemptions"] > 0
    assert [[c.token_ids for c in o.outputs] for o in outputs] == [[c.token_ids for c in o.outputs] for o in roomy]


def test_chunked_prefill_matches_hf(prompts, hf_greedy):
    llm = LLM(model=MODEL, kv_cache_memory="64MiB", max_num_batched_tokens=24, log_stats_interval=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == hf_greedy[:3]


def test_prefix_caching_on_reuses_blocks_and_keeps_tokens(llm, prompts, hf_greedy):
    before = llm.stats()["prefix_cache_hits"]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.stats()["prefix_cache_hits"] > before
    assert token_ids(outputs) == hf_greedy


def test_prefix_caching_off_has_no_hits_and_keeps_tokens(prompts, hf_greedy):
    llm = LLM(model=MODEL, kv_cache_memory="64MiB", enable_prefix_caching=False, log_stats_interval=0)
    for _ in range(2):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], GREEDY, use_tqdm=False)
        assert token_ids(outputs) == hf_greedy[:4]
    assert llm.stats()["prefix_cache_hits"] == 0


def test_text_prompt_and_stats(llm):
    out = llm.generate("Solve 12*13.", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out.prompt == "Solve 12*13."
    assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids, skip_special_tokens=True)
    stats = llm.stats()
    for key in ("num_kv_blocks", "kv_blocks_used", "kv_blocks_peak", "num_preemptions", "prefix_cache_hits",
                "generation_tokens_per_s"):
        assert key in stats
    assert stats["kv_blocks_used"] == 0 and 0 < stats["kv_blocks_peak"] <= stats["num_kv_blocks"]


def test_kv_history_is_bounded_and_evenly_strided():
    history = History(max_points=8)
    for step in range(1000):
        history.append((step,))
    steps = [p[0] for p in history.points]
    assert len(steps) < 8 and steps[0] == 0 and steps[-1] > 1000 - 2 * history.stride
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1
