"""A decoder layer's small ops, fused: the CPU kernels in float32 on CPU, the same math in torch elsewhere."""

import torch
import torch.nn.functional as F

from memshare.layers.cpu_kernels import cpu_ops, kernel_applies
from memshare.layers.rotary import rotate_neox


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernel_applies(x):
        return cpu_ops().rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); on CPU in place in x and residual."""
    if kernel_applies(x) and x.is_contiguous() and residual.is_contiguous():
        cpu_ops().fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return F.rms_norm(residual, weight.shape, weight, eps), residual


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in HF's rotate-half convention on q [T, heads, d], k [T, kv_heads, d] with cos/sin [T, d].

    On CPU the rotation is done in place.
    """
    if kernel_applies(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        cpu_ops().rotary_embedding(q, k, cos, sin)
        return q, k
    half = cos.shape[-1] // 2  # HF repeats the angles for both halves
    cos, sin = cos[:, None, :half], sin[:, None, :half]
    return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] -> silu(x[:, :I]) * x[:, I:]."""
    if kernel_applies(x):
        return cpu_ops().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
