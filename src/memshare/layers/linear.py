"""Linear layers for CPU inference, their weights repacked once at load.

A decode step streams every weight from DRAM once. The panel kernel (layers/cpu_kernels.py) reads weights stored as
panels of 16 output channels, in float32 or as quantized codes with a scale (and a minimum) per output channel and
group of 32 inputs: int8 (GGUF's Q8_0) and int4 (Q4_1, and Q4_0 with minimum -8 scale). Quantized weights meet the
input rounded to int8 per 32 values, in integer dot products, as GGUF's kernels do. At one row of input it runs at
~27 GB/s where oneDNN spends ~50 us a call on small shapes; from 32 rows on it matches oneDNN. Where the kernel
cannot build (no compiler, no AVX2), float32 weights go to oneDNN's blocked layout instead (1.1-2.2x faster than
`F.linear` on a plain [out, in] weight), the way vLLM's CPU backend packs them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memshare.errors import QuantizationError
from memshare.layers.cpu_kernels import cpu_ops, kernel_range

PANEL = 16
GROUP_SIZE = 32
# Weight formats quantized from float weights at load; "gguf" keeps a GGUF file's own codes (models/gguf_codes.py).
BITS = {"int8": 8, "int4": 4}


@dataclass(slots=True)
class QuantizedRows:
    """A weight [N, K] as codes: w[n, k] = scale[n, k // G] * codes[n, k] + zero[n, k // G] (zero None: 0)."""

    codes: torch.Tensor  # [N, K]: int8 for 8 bits; uint8 in 0..15 for 4 bits
    scale: torch.Tensor  # [N, K / G] float32
    zero: torch.Tensor | None
    bits: int

    def dequantize(self) -> torch.Tensor:
        group = self.codes.shape[1] // self.scale.shape[1]
        weight = self.codes.float() * self.scale.repeat_interleave(group, 1)
        return weight if self.zero is None else weight + self.zero.repeat_interleave(group, 1)

    def take(self, rows: torch.Tensor) -> "QuantizedRows":
        return QuantizedRows(self.codes[rows], self.scale[rows], None if self.zero is None else self.zero[rows],
                             self.bits)


def quantize_rows(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> QuantizedRows:
    """Round-to-nearest codes of `weight` [N, K] per group of `group_size` inputs: int8 symmetric (GGUF's Q8_0),
    int4 asymmetric with the group's minimum (Q4_1)."""
    n, k = weight.shape
    if k % group_size:
        raise QuantizationError(f"in_features {k} is not a multiple of the quantization group size {group_size}")
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    if bits == 8:
        scale = groups.abs().amax(-1) / 127
        codes = torch.round(groups / scale.clamp_min(1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedRows(codes.reshape(n, k), scale, None, 8)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    codes = torch.round((groups - low[..., None]) / scale.clamp_min(1e-30)[..., None]).clamp(0, 15)
    return QuantizedRows(codes.to(torch.uint8).reshape(n, k), scale, low, 4)


def _panels(rows: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N / 16), C, 16], the missing rows zero."""
    n = rows.shape[0]
    padded = F.pad(rows, (0, 0, 0, -n % PANEL))
    return padded.reshape(-1, PANEL, rows.shape[1]).transpose(1, 2).contiguous()


def _unpanel(panels: torch.Tensor, n: int) -> torch.Tensor:
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n]


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes -> the kernel's panels: four consecutive inputs of a channel side by side, [P, K/4, 16, 4]
    (int8); for int4, channels 0-7 of those in the low nibbles and 8-15 in the high ones, [P, K/4, 8, 4]."""
    quads = _panels(codes).unflatten(1, (-1, 4)).transpose(2, 3).contiguous()  # [P, K/4, 16, 4]
    return quads[:, :, :8] | (quads[:, :, 8:] << 4) if bits == 4 else quads


def _unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    quads = torch.cat([data & 15, data >> 4], 2) if bits == 4 else data
    return _unpanel(quads.transpose(2, 3).flatten(1, 2), n)


class PanelLinear(nn.Module):
    """`nn.Linear` in inference on float32 or quantized weights in panels, run by the CPU panel kernel."""

    def __init__(self, weight: torch.Tensor | QuantizedRows, bias: torch.Tensor | None) -> None:
        super().__init__()
        quantized = isinstance(weight, QuantizedRows)
        self.out_features, self.in_features = (weight.codes if quantized else weight).shape
        self.bits = weight.bits if quantized else 32
        self.group_size = self.in_features // weight.scale.shape[1] if quantized else 0
        if self.group_size % GROUP_SIZE:  # the kernel rounds x per 32 inputs, within one weight group
            raise QuantizationError(f"quantization groups of {self.group_size} inputs; the kernel needs multiples "
                                    f"of {GROUP_SIZE}")
        empty = torch.empty(0)
        data = _panels(weight.detach().float()) if not quantized else _pack_codes(weight.codes, self.bits)
        self.register_buffer("data", data)
        self.register_buffer("scale", _panels(weight.scale) if quantized else empty)
        self.register_buffer("zero", _panels(weight.zero) if quantized and weight.zero is not None else empty)
        self.register_buffer("bias", empty if bias is None else bias.detach().float())
        # A plain attribute: reading four buffers through nn.Module.__getattr__ costs ~4 us a call.
        self.kernel_args = (self.data, self.scale, self.zero, self.bias, self.bits, self.out_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        with kernel_range(lambda: f"memshare::panel_linear {x.numel() // k}x{k} @ {self.out_features}x{k}"):
            return cpu_ops().panel_linear(x, *self.kernel_args)

    def weight_rows(self) -> torch.Tensor | QuantizedRows:
        """The weight as it was given: float [N, K] or its QuantizedRows."""
        n = self.out_features
        if self.bits == 32:
            return _unpanel(self.data, n)
        return QuantizedRows(_unpack_codes(self.data, self.bits, n), _unpanel(self.scale, n),
                             _unpanel(self.zero, n) if self.zero.numel() else None, self.bits)

    def extra_repr(self) -> str:
        kind = "float32" if self.bits == 32 else f"int{self.bits}, group {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias.numel() > 0}"


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


def panels_available() -> bool:
    """Whether the panel kernel runs here (a compiler, and a CPU with AVX2 and FMA)."""
    return cpu_ops() is not None and cpu_ops().panel_linear_available()


def require_panels(quantization: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raises QuantizationError where quantized weights cannot run: they run on CPU, in float32, in the panel kernel."""
    if device.type != "cpu" or dtype != torch.float32:
        raise QuantizationError(f"quantization={quantization!r} runs on CPU in float32 (dtype='float32'), not on "
                                f"{device.type} in {dtype}")
    if not panels_available():
        raise QuantizationError(f"quantization={quantization!r} needs memshare's CPU kernels, which need a C++ "
                                "compiler and a CPU with AVX2 and FMA; neither is here (see the warning above)")


def fuse_linears(*linears: nn.Module) -> nn.Module:
    """One linear layer whose output is the concatenation of `linears`' outputs; quantized parts stay quantized
    where all share one format, else every part runs dequantized."""
    bias = None if getattr(linears[0], "bias", None) is None or not linears[0].bias.numel() else \
        torch.cat([linear.bias.detach() for linear in linears])
    parts = [linear.weight_rows() if isinstance(linear, PanelLinear) else linear.weight.detach()
             for linear in linears]
    formats = {(p.bits, p.scale.shape[1], p.zero is None) if isinstance(p, QuantizedRows) else None for p in parts}
    if len(formats) == 1 and None not in formats:
        rows = QuantizedRows(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                             None if parts[0].zero is None else torch.cat([p.zero for p in parts]), parts[0].bits)
        return PanelLinear(rows, bias)
    weight = torch.cat([p.dequantize() if isinstance(p, QuantizedRows) else p for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def packing_applies(model: nn.Module) -> bool:
    parameter = next(model.parameters())
    return parameter.device.type == "cpu" and parameter.dtype == torch.float32


def prepack_linear_layers(model: nn.Module, quantization: str | None = None) -> int:
    """Swap every `nn.Linear` of a float32 CPU model for a `PanelLinear` (quantized to `quantization`, "int8" or
    "int4", where given), or a oneDNN `PackedLinear` where the panel kernel does not run; returns how many.

    A tied output projection is packed too; the embedding keeps the original weight.
    """
    if not packing_applies(model):
        return 0
    panels = panels_available()
    if not panels and not torch.backends.mkldnn.is_available():
        return 0
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        weight = linear.weight.detach()
        if quantization in BITS:
            weight = quantize_rows(weight, BITS[quantization])
        packed = PanelLinear(weight, linear.bias) if panels else PackedLinear(linear)
        setattr(model.get_submodule(parent), attr, packed)
    return len(targets)
