"""Rotary position embeddings (RoPE) in the NeoX layout HF's Llama family uses (rotate-half): rotating queries and
keys, and undoing the rotation of cached keys, which stage 2 and eviction's remap compare across positions. Which
models rotate this way is decided in models/registry.py (`key_unrotation`)."""

from collections.abc import Callable

import torch
from torch import nn


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] rotated NeoX-style (HF's rotate-half) by the angles of `cos`/`sin` [..., head_dim / 2]."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def unrotate_neox(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [..., head_dim] rotated NeoX-style with the angles of `cos`/`sin` [..., rot / 2] -> unrotated.

    `cos` and `sin` broadcast against `keys` without its last dimension; dimensions past `rot` are kept.
    """
    half = cos.shape[-1]
    x1, x2, tail = keys[..., :half], keys[..., half : 2 * half], keys[..., 2 * half :]
    # NeoX RoPE is (x1 cos - x2 sin, x2 cos + x1 sin); rotating back by the same angle flips the sign of sin.
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, tail), dim=-1)


UnrotateKeys = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Hugging Face rope types (`rope_parameters["rope_type"]`) whose `rotary_emb(x, position_ids)` angles are a function of
# each position alone, so that the NeoX un-rotation with the angles of a key's own position inverts its rotation.
NEOX_ROPE_TYPES = {
    "default": "angles position × base^(-2i/d)",
    "linear": "the default angles of position / factor",
    "dynamic": "NTK rescaling starts past max_position_embeddings, which max_model_len never exceeds: default angles",
    "yarn": "fixed per-frequency blend of interpolated and original angles; its attention_factor scales cos and sin "
            "alike, and the un-rotation divides it out",
    "llama3": "fixed per-frequency smoothing of the default angles",
}
# Refused, with why; any other type (proportional, multimodal sections, ...) is refused as unchecked.
REFUSED_ROPE_TYPES = {
    "longrope": "picks its short or long factors from the longest position of the whole forward batch, so a key's "
                "rotation depends on what it was batched with",
}


def rope_type_problem(rope_type: object) -> str | None:
    """Why keys rotated with HF rope type `rope_type` cannot be un-rotated from their positions alone; None if they
    can. A dict (one rope type per layer type, e.g. Gemma 3) is refused: one un-rotation serves every layer."""
    if isinstance(rope_type, dict):
        return f"its rope types differ by layer type ({rope_type}); the un-rotation applies one rotation to every layer"
    if rope_type in NEOX_ROPE_TYPES:
        return None
    why = REFUSED_ROPE_TYPES.get(rope_type, "its angles are not checked to depend on the position alone")
    return f"rope type {rope_type!r} {why} (un-rotatable: {', '.join(NEOX_ROPE_TYPES)})"


def rotates_neox(apply_rotary_pos_emb: Callable, rotary_emb: nn.Module, head_dim: int) -> bool:
    """Whether an HF modeling module's `apply_rotary_pos_emb(q, k, cos, sin)` rotates whole heads NeoX-style
    (rotate-half) with `rotary_emb`'s cos/sin: checked on random keys, False if it fails or differs (interleaved
    pairs, partial heads, another argument order)."""
    device = next(rotary_emb.buffers(), torch.empty(0)).device
    keys = torch.randn(1, 2, 8, head_dim, generator=torch.Generator().manual_seed(0)).to(device)  # [b, heads, n, d]
    try:
        cos, sin = rotary_emb(keys, torch.arange(1, 9, device=device).view(1, -1))
        half = head_dim // 2
        if cos.shape[-1] != head_dim or not torch.equal(cos[..., :half], cos[..., half:]):
            return False
        _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
        expected = rotate_neox(keys, cos[:, None, :, :half], sin[:, None, :, :half])
        return rotated.shape == keys.shape and torch.allclose(rotated.float(), expected, atol=1e-5, rtol=1e-5)
    except Exception:  # any other signature or shape convention is "not NeoX as checked"
        return False


class NeoxKeyUnrotation:
    """Cached keys [..., n, kv_heads, head_dim] with the NeoX RoPE rotation of `positions` [n] undone, from the
    angles of an HF rotary embedding module (`rotary_emb(x, position_ids) -> (cos, sin)`, each [1, n, head_dim] with
    the angles repeated for both halves and scaled by its `attention_scaling`)."""

    def __init__(self, rotary_emb: nn.Module) -> None:
        self.rotary_emb = rotary_emb

    def __call__(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb(keys, positions.view(1, -1))
        half = cos.shape[-1] // 2  # HF repeats the angles for both halves of the rotated dimensions
        cos, sin = cos[0, :, None, :half], sin[0, :, None, :half]
        scaling = getattr(self.rotary_emb, "attention_scaling", 1.0)
        if scaling != 1.0:  # yarn: the rotated dimensions hold scaling × R·k; undo R and the scaling
            cos, sin = cos / scaling**2, sin / scaling**2
        return unrotate_neox(keys, cos, sin)
