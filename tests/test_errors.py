"""Bad input raises a typed error, changes nothing, and the engine keeps serving."""

import huggingface_hub.constants
import pytest

from memshare import (
    LLM,
    KVCacheTooSmallError,
    PromptTooLongError,
    SamplingParams,
    UnknownModelError,
)
from memshare.errors import ChecksumError
from memshare.models import weights

from .conftest import MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_unknown_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: no hub look-up
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'.*not a Hugging Face Hub model"):
        LLM(model="no-such-model")
    with pytest.raises(UnknownModelError):
        LLM(model=str(tmp_path))


def test_bad_checksum_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARE_CACHE", str(tmp_path))
    entry = weights.RegisteredModel("fake", (), (("memshare", "errors.py"),), "fake.gguf", 1, "0" * 64)
    with pytest.raises(ChecksumError, match="does not match the pinned"):
        weights.fetch_registered(entry)
    assert not list(tmp_path.rglob("*.gguf"))


def test_prompt_longer_than_context_then_engine_still_serves(llm):
    expected = llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    too_long = list(range(100, 100 + 9000))
    with pytest.raises(PromptTooLongError, match="9000 tokens"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": too_long}], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_bad_sampling_params_and_token_ids_leave_engine_serving(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("Hi", SamplingParams(top_p=0.0), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [10**9]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop token ids"):
        llm.generate("Hi", SamplingParams(stop_token_ids=[10**9], min_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) > 0


def test_kv_budget_too_small():
    with pytest.raises(KVCacheTooSmallError, match="max_model_len=512"):
        LLM(model=MODEL, num_kv_blocks=4, max_model_len=512)
    with pytest.raises(KVCacheTooSmallError, match="holds no block"):
        LLM(model=MODEL, kv_cache_memory="1KiB")
    small = LLM(model=MODEL, num_kv_blocks=4, log_stats_interval=0)
    with pytest.raises(KVCacheTooSmallError, match="raise kv_cache_memory"):
        small.generate({"prompt_token_ids": list(range(100, 200))}, GREEDY, use_tqdm=False)
    out = small.generate("Hi", SamplingParams(temperature=0, max_tokens=100), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason in ("stop", "length")
    assert small.stats()["kv_blocks_peak"] <= 4


def test_bad_engine_config():
    with pytest.raises(ValueError, match="block_size"):
        LLM(model=MODEL, block_size=0)
    with pytest.raises(ValueError, match="model_impl must be one of"):
        LLM(model=MODEL, model_impl="vllm")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(model=MODEL, kv_cache_memory="lots")
