"""Linear layers with oneDNN-prepacked weights for float32 CPU inference.

A decode step streams every weight from DRAM at small batch; oneDNN's blocked weight layout runs those
GEMMs 1.1-2.2x faster than `F.linear` on a plain [out, in] weight here (the 49k-wide `lm_head` of
smollm2-135m: 36 -> 17 ms at batch 32). Packing is done once at load, the way vLLM's CPU backend does.
"""

import torch
from torch import nn


class PackedLinear(nn.Module):
    """`nn.Linear` in inference with its weight reordered once into oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_applies(model: nn.Module) -> bool:
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def prepack_linear_layers(model: nn.Module) -> int:
    """Swap every `nn.Linear` of a float32 CPU model for a `PackedLinear`; returns how many were swapped.

    A tied output projection is packed too; the embedding keeps the original weight.
    """
    if not packing_applies(model):
        return 0
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, PackedLinear(linear))
    return len(targets)
