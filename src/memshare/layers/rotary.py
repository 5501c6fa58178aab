import torch


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
