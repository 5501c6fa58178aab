"""vLLM's load_format="dummy" and skip_tokenizer_init: the shipped config-only shapes build on random weights with no
weights, hub or tokenizer files, and run on token ids."""

import pytest
import torch
from transformers import AutoConfig, Qwen3Config

from memshare import LLM, SamplingParams
from memshare.config import EngineConfig, share_config
from memshare.entrypoints.cli import build_parser, engine_kwargs
from memshare.errors import UnknownModelError
from memshare.models.loader import dummy_model, kv_geometry
from memshare.models.weights import CONFIG_ONLY_MODELS, resolve_model

TINY = dict(model="tiny-qwen2", load_format="dummy", skip_tokenizer_init=True, num_kv_blocks=64, log_stats_interval=0)
PROMPTS = [[1, 5, 9, 3, 7], [42, 17, 99], list(range(10, 60))]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = {  # (layers, KV heads, head_dim, model_type) of the Hugging Face configs
    "r1-distill-qwen-7b": (28, 4, 128, "qwen2"),
    "qwen3-8b": (36, 8, 128, "qwen3"),
    "r1-distill-qwen-14b": (48, 8, 128, "qwen2"),
    "tiny-qwen2": (2, 2, 16, "qwen2"),
}


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return LLM(**TINY)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("device", DEVICES)
def test_dummy_weights_greedy_tokens_are_seeded_and_equal_transformers(device):
    outputs = [LLM(**TINY, device=device, dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
               for _ in range(2)]
    assert token_ids(outputs[0]) == token_ids(outputs[1])  # seeded: two builds are the same model
    assert all(o.outputs[0].text == "" and len(o.outputs[0].token_ids) == 24 for o in outputs[0])
    # transformers' own modules and generate on the same random weights (the engine fuses and replaces its layers)
    hf_config = AutoConfig.from_pretrained(resolve_model("tiny-qwen2")[0])
    reference = dummy_model(hf_config, torch.float32, torch.device(device), attn_implementation="eager")
    with torch.inference_mode():
        for prompt, output in zip(PROMPTS, outputs[0]):
            ids = reference.generate(torch.tensor([prompt], device=device), max_new_tokens=24, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            assert ids[0, len(prompt):].tolist() == output.outputs[0].token_ids


def test_dummy_weights_on_any_config_directory_qwen3_through_the_transformers_modules(tmp_path):
    """qwen3-8b's architecture has no lean forward (models/llama.py): the HF modules run it on the paged cache."""
    Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=512).save_pretrained(tmp_path)
    llm = LLM(**{**TINY, "model": str(tmp_path)})
    assert llm.llm_engine.model_runner.paged_model is None
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    reference = dummy_model(AutoConfig.from_pretrained(tmp_path), torch.float32, torch.device("cpu"),
                            attn_implementation="eager")
    with torch.inference_mode():
        for prompt, output in zip(PROMPTS, outputs):
            ids = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
            assert ids[0, len(prompt):].tolist() == output.outputs[0].token_ids


def test_dummy_weights_are_small_and_norms_stay_at_one():
    model = dummy_model(AutoConfig.from_pretrained(resolve_model("tiny-qwen2")[0]), torch.float32,
                        torch.device("cpu"))
    params = dict(model.named_parameters())
    assert all(p.abs().max() <= 1e-3 and p.std() > 1e-4 for name, p in params.items() if "norm" not in name)
    assert all(torch.equal(p, torch.ones_like(p)) for name, p in params.items() if "norm" in name)


def test_token_id_prompts_in_every_form_and_eos_from_the_generation_config(tiny):
    outputs = tiny.generate([PROMPTS[0], {"prompt_token_ids": PROMPTS[1]}], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == PROMPTS[:2] and all(o.prompt is None for o in outputs)
    assert tiny.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert tiny.llm_engine.model_runner.eos_token_ids == {2}  # tiny-qwen2's config
    logprobs = tiny.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, logprobs=1), use_tqdm=False)
    assert all(e.decoded_token is None for step in logprobs[0].outputs[0].logprobs for e in step.values())


def test_text_prompts_chat_and_stop_strings_need_a_tokenizer(tiny):
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        tiny.generate("Solve 12*13.", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        tiny.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny.generate(PROMPTS[0], SamplingParams(max_tokens=4, stop=["\n"]), use_tqdm=False)
    assert not tiny.llm_engine.has_unfinished_requests()
    greedy = token_ids(tiny.generate(PROMPTS[0], GREEDY, use_tqdm=False))[0]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[greedy[2]])
    stopped = tiny.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    expected = greedy[:greedy.index(greedy[2]) + 1]
    assert (stopped.token_ids, stopped.finish_reason, stopped.text) == (expected, "stop", "")


def test_memshare_needs_a_tokenizer_and_other_policies_do_not():
    with pytest.raises(ValueError, match="memshare splits steps on decoded text; it needs a tokenizer"):
        LLM(**TINY, share=share_config("memshare"))
    for policy, values in (("random", {"share_ratio": 0.4}), ("streamingllm", {"kv_budget": 2}),
                           ("h2o", {"kv_budget": 2})):
        llm = LLM(**TINY, share=share_config(policy, **values))
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 80 and o.outputs[0].text == "" for o in outputs), policy
        assert llm.stats()["affected_ratio"] > 0, policy


@pytest.mark.parametrize("name", list(SHAPES))
def test_shipped_shapes_give_the_kv_geometry_and_need_load_format_dummy(name):
    layers, kv_heads, head_dim, model_type = SHAPES[name]
    config = AutoConfig.from_pretrained(resolve_model(name)[0])
    assert config.model_type == model_type and not config.tie_word_embeddings
    kv = kv_geometry(EngineConfig(model=name))  # the config alone: no weights, no load_format needed
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (layers, kv_heads, head_dim)
    with pytest.raises(UnknownModelError, match="ships only a config.*load_format='dummy'"):
        LLM(model=name, skip_tokenizer_init=True)  # refused before anything is allocated


def test_shipped_reasoning_shapes_are_the_hugging_face_ones():
    seven, qwen3, fourteen = (AutoConfig.from_pretrained(resolve_model(n)[0])
                              for n in ("r1-distill-qwen-7b", "qwen3-8b", "r1-distill-qwen-14b"))
    assert (seven.hidden_size, seven.num_attention_heads, seven.intermediate_size, seven.vocab_size,
            seven.max_position_embeddings, seven.rms_norm_eps, seven.use_sliding_window) == \
        (3584, 28, 18944, 152064, 131072, 1e-6, False)
    assert (qwen3.hidden_size, qwen3.num_attention_heads, qwen3.intermediate_size, qwen3.vocab_size,
            qwen3.max_position_embeddings) == (4096, 32, 12288, 151936, 40960)
    assert (fourteen.hidden_size, fourteen.num_attention_heads, fourteen.intermediate_size, fourteen.vocab_size) == \
        (5120, 40, 13824, 152064)
    assert set(CONFIG_ONLY_MODELS) == set(SHAPES)


def test_no_tokenizer_files_is_a_typed_error_naming_skip_tokenizer_init(tmp_path, tiny):
    with pytest.raises(UnknownModelError, match="skip_tokenizer_init=True"):
        LLM(**{**TINY, "skip_tokenizer_init": False})
    # A real weights directory with no tokenizer: refused with the tokenizer, served without it.
    reference = dummy_model(AutoConfig.from_pretrained(resolve_model("tiny-qwen2")[0]), torch.float32,
                            torch.device("cpu"), attn_implementation="eager")
    reference.save_pretrained(tmp_path)
    with pytest.raises(UnknownModelError, match="skip_tokenizer_init=True"):
        LLM(model=str(tmp_path), num_kv_blocks=64)
    loaded = LLM(model=str(tmp_path), skip_tokenizer_init=True, num_kv_blocks=64, log_stats_interval=0)
    assert token_ids(loaded.generate(PROMPTS, GREEDY, use_tqdm=False)) == \
        token_ids(tiny.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_load_format_is_checked_and_both_options_have_flags():
    with pytest.raises(ValueError, match=r"load_format must be one of \('auto', 'dummy'\)"):
        EngineConfig(load_format="safetensors")
    parse = build_parser().parse_args
    kwargs = engine_kwargs(parse(["generate", "x", "--load-format", "dummy", "--skip-tokenizer-init"]))
    assert (kwargs["load_format"], kwargs["skip_tokenizer_init"]) == ("dummy", True)
    assert (EngineConfig().load_format, EngineConfig().skip_tokenizer_init) == ("auto", False)
    defaults = engine_kwargs(parse(["generate", "x"]))
    assert (defaults["load_format"], defaults["skip_tokenizer_init"]) == ("auto", False)
    with pytest.raises(SystemExit):
        parse(["generate", "x", "--load-format", "safetensors"])
