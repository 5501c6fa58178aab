import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memshare.config import EngineConfig
from memshare.layers.attention import ATTN_IMPLEMENTATION, register_paged_attention
from memshare.models.registry import resolve_model

logger = logging.getLogger("memshare")


def pick_device(config: EngineConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    # bfloat16 matmuls are ~10x slower than float32 on these CPUs; on GPUs bfloat16 is the norm.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True, slots=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def kv_geometry(config: EngineConfig) -> KVGeometry:
    """The shape of the model's KV cache, from its config alone (no weights loaded)."""
    path, gguf_file = resolve_model(config.model)
    hf = AutoConfig.from_pretrained(path, gguf_file=gguf_file).get_text_config()
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return KVGeometry(hf.num_hidden_layers, hf.num_key_value_heads, head_dim,
                      pick_dtype(config, pick_device(config)))


def load_model(config: EngineConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.device]:
    """The Hugging Face model (with memshare's paged attention plugged in) and its tokenizer."""
    path, gguf_file = resolve_model(config.model)
    device = pick_device(config)
    dtype = pick_dtype(config, device)
    register_paged_attention()
    hf_config = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    if getattr(hf_config, "use_sliding_window", False) or getattr(hf_config, "layer_types", None) and \
            any(t != "full_attention" for t in hf_config.layer_types):
        logger.warning("model uses sliding-window layers; memshare attends over the full context instead")
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    return model, tokenizer, device
