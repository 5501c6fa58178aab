"""vLLM's `LLM` surface: its engine options are taken or refused with what to use instead, hub ids load through
huggingface_hub's cache, and the engine seed makes unseeded sampling reproducible."""

import ast
from dataclasses import fields
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from memshare import LLM, EngineConfig, MemShareError, SamplingParams, UnknownModelError
from memshare.engine.vllm_options import VLLM_ALIASES, VLLM_FIXED, engine_config
from memshare.errors import UnsupportedOptionError

from .conftest import MODEL

VLLM = Path(__file__).parents[1] / "bench/.venv-vllm/lib/python3.11/site-packages/vllm"
TINY = dict(model="tiny-qwen2", load_format="dummy", skip_tokenizer_init=True, log_stats_interval=0)


@pytest.mark.parametrize("kwargs, advice", [
    ({"gpu_memory_utilization": 0.9}, "kv_cache_memory"), ({"swap_space": 4}, "not supported"),
    ({"cpu_offload_gb": 2}, "not supported"), ({"quantization_config": {}}, "quantization="),
    ({"tensor_parallel_size": 2}, "vLLM with the memshare plugin"), ({"enable_lora": True}, "merge_and_unload"),
    ({"max_num_seq": 8}, "did you mean 'max_num_seqs'"), ({"kv_cache_memry": "1GiB"}, "did you mean 'kv_cache_memory'"),
])
def test_vllm_options_refused_with_what_to_use_instead(kwargs, advice):
    with pytest.raises(UnsupportedOptionError, match=advice) as error:
        LLM(model=MODEL, **kwargs)
    assert next(iter(kwargs)) in str(error.value)
    assert isinstance(error.value, MemShareError) and isinstance(error.value, TypeError)


def test_vllm_names_of_engine_options():
    config = engine_config(MODEL, kv_cache_memory_bytes=1 << 24, num_gpu_blocks_override=12, tensor_parallel_size=1,
                           pipeline_parallel_size=1, enable_chunked_prefill=True, disable_log_stats=True, seed=3,
                           trust_remote_code=False, dtype="half", max_model_len=512, enforce_eager=True)
    assert (config.kv_cache_memory, config.num_kv_blocks, config.log_stats_interval) == (1 << 24, 12, 0)
    assert (config.seed, config.dtype, config.max_model_len, config.enforce_eager) == (3, "half", 512, True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        engine_config(MODEL, dtype="float64x")


def vllm_option_names() -> set[str]:
    """Every EngineArgs field and LLM() parameter of the vLLM in bench/.venv-vllm."""
    engine_args = ast.parse((VLLM / "engine/arg_utils.py").read_text())
    cls = next(n for n in engine_args.body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
    names = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    llm = ast.parse((VLLM / "entrypoints/llm.py").read_text())
    cls = next(n for n in llm.body if isinstance(n, ast.ClassDef) and n.name == "LLM")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return names | {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}


@pytest.mark.skipif(not VLLM.exists(), reason="needs vLLM 0.32 in bench/.venv-vllm (make vllm-env)")
def test_every_vllm_option_is_taken_or_refused_with_advice():
    taken = {f.name for f in fields(EngineConfig)} | set(VLLM_ALIASES) | {"disable_log_stats", "chat_template"}
    names = vllm_option_names()
    assert len(names) > 200
    for name in sorted(names - taken):
        with pytest.raises(UnsupportedOptionError) as error:
            engine_config(MODEL, **{name: object()})
        assert name in str(error.value) and "unexpected" not in str(error.value), name
    assert set(VLLM_FIXED) <= names


def test_engine_seed_makes_unseeded_sampling_reproducible():
    params = SamplingParams(temperature=1.0, max_tokens=8)
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    runs = []
    for global_seed in (0, 1):  # torch's global generator, which unseeded requests draw from without an engine seed
        torch.manual_seed(global_seed)
        runs.append([o.outputs[0].token_ids for o in LLM(**TINY, seed=5).generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_tokenizer_option(model_dir):
    llm = LLM(**TINY | {"skip_tokenizer_init": False}, tokenizer=str(model_dir))
    assert llm.get_tokenizer().encode("Hello") == [19556]
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, seed=0),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, model_dir) -> Path:
    """A Hugging Face Hub cache holding HuggingFaceTB/SmolLM2-135M-Instruct (the bundled smollm2-135m files), read
    offline."""
    repo = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    # huggingface_hub reads both when imported; set them as the environment would have.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_hub_id_loads_from_the_cache_offline(offline_hub, llm):
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = llm.generate("Solve 12*13.", params, use_tqdm=False)[0].outputs[0].token_ids
    hub = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct", kv_cache_memory="64MiB", log_stats_interval=0)
    assert hub.generate("Solve 12*13.", params, use_tqdm=False)[0].outputs[0].token_ids == expected
    with pytest.raises(UnknownModelError, match=r"unknown model 'HuggingFaceTB/NoSuchModel'.*HF_HUB_OFFLINE"):
        LLM(model="HuggingFaceTB/NoSuchModel")
