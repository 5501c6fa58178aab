"""What memshare knows of an architecture beyond transformers' modules, looked up from the Hugging Face `model_type`
as in vLLM's model registry: the lean forward that takes over the HF decoder (`lean_model`), and how the RoPE rotation
of its cached keys is undone (`key_unrotation`). Every other architecture runs through the HF modules with paged
attention plugged into transformers' attention registry. Where a model's weights come from is models/weights.py."""

import sys

import torch
from torch import nn
from transformers import PreTrainedModel

from memshare.errors import UnsupportedRotaryError
from memshare.layers.rotary import NeoxKeyUnrotation, UnrotateKeys, rope_type_problem, rotates_neox
from memshare.models.llama import PagedLlamaForCausalLM
from memshare.models.loader import head_dim as config_head_dim

# HF model_type -> memshare's lean forward over the same weights (built as cls(hf_model) where cls.applies(hf_model)).
LEAN_MODELS: dict[str, type[nn.Module]] = {
    "llama": PagedLlamaForCausalLM,
    "mistral": PagedLlamaForCausalLM,
    "qwen2": PagedLlamaForCausalLM,
}

# HF model types that rotate interleaved pairs of dimensions ((x0, x1), (x2, x3), ...: GPT-J style), which their
# configs do not say; `rotates_neox` catches any other model whose rotation is not NeoX-style.
INTERLEAVED_ROPE_MODELS = frozenset({"gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "helium"})


def lean_model(hf_model: PreTrainedModel, model_impl: str = "auto") -> nn.Module | None:
    """memshare's lean forward over `hf_model` where its architecture has one and `model_impl` is "auto" (it takes
    over the HF decoder layers); None: the HF modules run."""
    if model_impl != "auto":
        return None
    lean = LEAN_MODELS.get(hf_model.config.model_type)
    return lean(hf_model) if lean is not None and lean.applies(hf_model) else None



def rotary_problems(hf_model: PreTrainedModel) -> list[str]:
    """Why the RoPE rotation of `hf_model`'s cached keys cannot be undone from their positions alone by the NeoX
    un-rotation (layers/rotary.py); empty if it can, or if the model has no rotary embeddings. Call it before
    `lean_model` takes over the HF layers."""
    config = hf_model.config.get_text_config()
    rotary = getattr(hf_model.base_model, "rotary_emb", None)
    if rotary is None:
        inner = sorted({type(m).__name__ for m in hf_model.modules() if "Rotary" in type(m).__name__})
        return [f"its rotary embeddings ({', '.join(inner)}) are not the model's `rotary_emb`"] if inner else []
    head_dim = config_head_dim(config)
    problems = []
    if config.model_type in INTERLEAVED_ROPE_MODELS or getattr(config, "rope_interleave", False):
        problems.append("it rotates interleaved pairs of dimensions (GPT-J style), not the two halves of each head "
                        "(NeoX style, the only one undone)")
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    rotary_dim = getattr(config, "rotary_dim", None) or round(head_dim * (getattr(config, "rotary_pct", 1.0) or 1.0))
    if factor < 1 or rotary_dim < head_dim:
        rotated = round(head_dim * factor) if factor < 1 else rotary_dim
        problems.append(f"partial rotary: it rotates {rotated} of each head's {head_dim} dimensions, where models "
                        "split the rotated part differently; only whole heads are undone")
    problem = rope_type_problem(getattr(rotary, "rope_type", rope.get("rope_type", "default")))
    if problem:
        problems.append(problem)
    if not problems:
        apply = getattr(sys.modules[type(hf_model).__module__], "apply_rotary_pos_emb", None)
        with torch.no_grad():
            if apply is None or not rotates_neox(apply, rotary, head_dim):
                problems.append("its modeling code's apply_rotary_pos_emb does not rotate whole heads NeoX-style "
                                "with the cos/sin of its rotary_emb (checked on random keys)")
    return problems


def key_unrotation(hf_model: PreTrainedModel, strict: bool = True) -> UnrotateKeys:
    """`unrotate_keys(keys [..., n, kv_heads, head_dim], positions [n]) -> keys` with `hf_model`'s RoPE rotation of
    `positions` undone (the identity for a model without rotary embeddings). Raises UnsupportedRotaryError for a
    rotation it cannot undo (`rotary_problems`); with `strict=False` it returns instead a function that raises it
    when called. Call it before `lean_model` takes over the HF layers."""
    problems = rotary_problems(hf_model)
    if not problems:
        rotary = getattr(hf_model.base_model, "rotary_emb", None)
        return _unchanged if rotary is None else NeoxKeyUnrotation(rotary)
    message = (f"{hf_model.config.model_type}: memshare cannot undo the RoPE rotation of its cached keys, which "
               f"sharing policies compare across positions (MemShare's stage 2, eviction's remap): "
               f"{'; '.join(problems)}. Run it dense (share='none').")
    if strict:
        raise UnsupportedRotaryError(message)

    def refused(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise UnsupportedRotaryError(message)

    return refused


def _unchanged(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return keys
