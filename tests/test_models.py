"""models/registry.py: the lean forward an architecture has, and the un-rotation of its cached keys' RoPE (or a
typed refusal), on tiny models built in memory from transformers' config classes."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memshare import LLM, MemShareConfig, SamplingParams, UnsupportedRotaryError
from memshare.models.llama import PagedLlamaForCausalLM
from memshare.models.registry import LEAN_MODELS, key_unrotation, lean_model

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
HEAD_DIM = 16


def tiny(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config], ids=["llama", "qwen2"])
def test_lookup_gives_the_lean_forward_of_llama_family_models(config_class):
    assert isinstance(lean_model(tiny(config_class(**SHAPE))), PagedLlamaForCausalLM)
    assert lean_model(tiny(config_class(**SHAPE)), model_impl="transformers") is None


def test_lookup_gives_none_for_an_architecture_without_a_lean_forward():
    assert "qwen3" not in LEAN_MODELS
    assert lean_model(tiny(Qwen3Config(**SHAPE, head_dim=HEAD_DIM))) is None
    assert lean_model(tiny(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4))) is None


ROPES = {
    "default": {},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("rope", ROPES.values(), ids=ROPES.keys())
def test_unrotation_inverts_the_models_own_rotation(rope):
    model = tiny(LlamaConfig(**SHAPE, rope_parameters={"rope_theta": 10000.0, **rope}))
    if rope.get("rope_type") == "yarn":  # its attention factor scales cos and sin: the un-rotation divides it out
        assert model.model.rotary_emb.attention_scaling > 1.1
    unrotate = key_unrotation(model)
    keys = torch.randn(3, 2, 40, HEAD_DIM, generator=torch.Generator().manual_seed(1))  # [layers, kv_heads, n, d]
    positions = torch.arange(150, 190)
    cos, sin = model.model.rotary_emb(keys, positions.view(1, -1))
    _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
    cached = rotated.transpose(1, 2)  # [layers, n, kv_heads, head_dim], as the KV cache holds them
    assert (cached - keys.transpose(1, 2)).abs().max() > 0.1
    torch.testing.assert_close(unrotate(cached, positions), keys.transpose(1, 2), atol=2e-6, rtol=2e-6)


def test_a_model_without_rotary_embeddings_keeps_its_keys():
    keys = torch.randn(5, 2, HEAD_DIM)
    assert key_unrotation(tiny(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4)))(keys, torch.arange(5)) \
        is keys


REFUSED = {
    "partial": (PhiConfig(**SHAPE, partial_rotary_factor=0.5),
                r"phi: .*partial rotary: it rotates 8 of each head's 16 dimensions"),
    "interleaved": (CohereConfig(**SHAPE), r"cohere: .*interleaved pairs of dimensions \(GPT-J style\)"),
    "interleaved and partial": (GPTJConfig(vocab_size=128, n_embd=64, n_layer=1, n_head=4, rotary_dim=8),
                                r"gptj: .*interleaved pairs.*; partial rotary: it rotates 8 of each head's 16"),
    "longrope": (LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 64}), r"llama: .*rope type 'longrope' picks its short or long factors"),
}


@pytest.mark.parametrize(("config", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_rotations_it_cannot_undo_are_refused_with_why(config, message):
    model = tiny(config)
    with pytest.raises(UnsupportedRotaryError, match=message):
        key_unrotation(model)
    unrotate = key_unrotation(model, strict=False)  # a dense engine builds; a call is refused the same way
    with pytest.raises(UnsupportedRotaryError, match=message):
        unrotate(torch.zeros(4, 2, HEAD_DIM), torch.arange(4))


def test_engine_refuses_sharing_at_build_on_a_model_it_cannot_unrotate_and_runs_it_dense(tmp_path):
    tiny(CohereConfig(**SHAPE, bos_token_id=0, eos_token_id=1, pad_token_id=0)).save_pretrained(tmp_path)
    options = dict(model=str(tmp_path), device="cpu", dtype="float32", num_kv_blocks=16, block_size=8,
                   skip_tokenizer_init=True, log_stats_interval=0)
    with pytest.raises(UnsupportedRotaryError, match="cohere: .*interleaved.*Run it dense"):
        LLM(**options, share=MemShareConfig())
    llm = LLM(**options)
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0, max_tokens=6,
                                                                                  ignore_eos=True), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 6
