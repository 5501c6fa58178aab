import torch


def unrotate_neox(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [..., head_dim] rotated NeoX-style with the angles of `cos`/`sin` [..., rot / 2] -> unrotated.

    `cos` and `sin` broadcast against `keys` without its last dimension; dimensions past `rot` are kept.
    """
    half = cos.shape[-1]
    x1, x2, tail = keys[..., :half], keys[..., half : 2 * half], keys[..., 2 * half :]
    # NeoX RoPE is (x1 cos - x2 sin, x2 cos + x1 sin); rotating back by the same angle flips the sign of sin.
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, tail), dim=-1)
