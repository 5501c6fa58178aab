import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from memshare.config import EngineConfig
from memshare.errors import QuantizationError, UnknownModelError, UnsupportedDtypeError
from memshare.layers.attention import ATTN_IMPLEMENTATION, register_paged_attention
from memshare.layers.linear import require_panels
from memshare.models.gguf_codes import swap_gguf_linears
from memshare.models.weights import CONFIG_ONLY_MODELS, gguf_source, resolve_model

logger = logging.getLogger("memshare")

# vLLM's dummy loader draws every weight uniformly from [-1e-3, 1e-3], seeded with 1234.
DUMMY_WEIGHT_RANGE = 1e-3
DUMMY_SEED = 1234
# What a Hugging Face tokenizer loads from: with none of them transformers builds an empty tokenizer without a word.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


def pick_device(config: EngineConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    # bfloat16 matmuls are ~10x slower than float32 on these CPUs; on GPUs bfloat16 is the norm.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX), from the kernel's CPU flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_weights(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Typed errors for weight formats this machine cannot run, before any weight loads."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        raise UnsupportedDtypeError("dtype='bfloat16' on this CPU has no AVX512_BF16 or AMX to multiply it: its "
                                    "matmuls run ~10x slower than float32; use dtype='float32' (the default on CPU), "
                                    "or quantization='int8' for a quarter of float32's weight bytes")
    if config.quantization:
        require_panels(config.quantization, device, dtype)
    if config.quantization == "gguf" and config.load_format == "dummy":
        raise QuantizationError("quantization='gguf' reads a GGUF file's codes; load_format='dummy' loads none")


@dataclass(frozen=True, slots=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def head_dim(hf_config: PretrainedConfig) -> int:
    """A text config's attention head size: its `head_dim` where it sets one, else hidden size over heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def kv_geometry(config: EngineConfig) -> KVGeometry:
    """The shape of the model's KV cache, from its config alone (no weights loaded)."""
    path, gguf_file = resolve_model(config.model, config.revision, config.download_dir)
    hf = AutoConfig.from_pretrained(path, gguf_file=gguf_file,
                                    trust_remote_code=config.trust_remote_code).get_text_config()
    return KVGeometry(hf.num_hidden_layers, hf.num_key_value_heads, head_dim(hf),
                      pick_dtype(config, pick_device(config)))


def dummy_model(hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                attn_implementation: str = ATTN_IMPLEMENTATION, seed: int = DUMMY_SEED) -> PreTrainedModel:
    """The model of `hf_config` on random weights (vLLM's load_format="dummy"), built directly on `device` so a 7B
    model never goes through host memory. Every weight is uniform in [-1e-3, 1e-3] from one generator seeded with
    `seed`, so two builds on the same device are identical. Unlike vLLM, normalization weights stay at 1: random ones
    of ~1e-3 would shrink the activations 1000x at every norm, far from a trained model's scale."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn_implementation)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)
    return model.eval()


def load_tokenizer(path: Path, gguf_file: str | None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if gguf_file is None and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise UnknownModelError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass skip_tokenizer_init=True and give "
            "prompts as token ids ([1, 2, 3] or {'prompt_token_ids': [...]}), or a tokenizer=")
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def load_model(config: EngineConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, torch.device]:
    """The Hugging Face model (with memshare's paged attention plugged in) and its tokenizer (None with
    `skip_tokenizer_init`); `load_format="dummy"` builds random weights from the model's config alone."""
    path, gguf_file = resolve_model(config.model, config.revision, config.download_dir)
    if config.model in CONFIG_ONLY_MODELS and config.load_format != "dummy":
        raise UnknownModelError(
            f"model {config.model!r} ships only a config (the shape of {CONFIG_ONLY_MODELS[config.model]}), no "
            "weights: pass load_format='dummy' for random weights, with skip_tokenizer_init=True and token-id prompts")
    tokenizer = None
    if not config.skip_tokenizer_init:
        # vLLM's `tokenizer`: a name, directory or hub id of its own (its default branch), resolved like a model.
        source = (path, gguf_file) if config.tokenizer is None else resolve_model(
            config.tokenizer, download_dir=config.download_dir)
        tokenizer = load_tokenizer(*source, config.trust_remote_code)
    device = pick_device(config)
    dtype = pick_dtype(config, device)
    check_weights(config, device, dtype)
    register_paged_attention()
    hf_config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=config.trust_remote_code)
    if getattr(hf_config, "use_sliding_window", False) or getattr(hf_config, "layer_types", None) and \
            any(t != "full_attention" for t in hf_config.layer_types):
        logger.warning("model uses sliding-window layers; memshare attends over the full context instead")
    if config.load_format == "dummy":
        model = dummy_model(hf_config, dtype, device)
        if (path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model, tokenizer, device
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
        trust_remote_code=config.trust_remote_code)
    model.to(device).eval()
    if config.quantization == "gguf":
        source = gguf_source(config.model, path, gguf_file)
        if source is None:
            raise QuantizationError(f"quantization='gguf' needs a GGUF model file; {config.model!r} loads from "
                                    f"{path}, which has none: use quantization='int8' or 'int4' to quantize at load")
        swap_gguf_linears(model, source)
    return model, tokenizer, device
