"""A GGUF file's quantized linear weights, kept quantized (`quantization="gguf"`): each linear layer whose tensor is
Q8_0, Q4_0 or Q4_1 is swapped for a `PanelLinear` on the file's own codes and scales, repacked, never rounded again.

transformers loads a GGUF by dequantizing it to float; its rows may come permuted (llama.cpp's converter reorders the
query and key rows for its rotary layout). Each file row is matched to the loaded row it dequantizes to, bit for
bit (gguf's own dequantization, the one transformers uses), so the codes follow whatever order transformers chose.
"""

import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

from memshare.errors import QuantizationError
from memshare.layers.linear import PanelLinear, QuantizedRows

logger = logging.getLogger("memshare")

Q = gguf.GGMLQuantizationType
# Block layouts: float16 scale d [, float16 minimum m], then the codes; Q4 packs value j in the low nibble of byte j
# and value j + 16 in its high nibble.
RUNNABLE = {Q.Q8_0: "Q8_0", Q.Q4_0: "Q4_0", Q.Q4_1: "Q4_1"}


def block_rows(data: np.ndarray, qtype: Q) -> QuantizedRows:
    """The codes of a [N, bytes] tensor of Q8_0, Q4_0 or Q4_1 blocks as QuantizedRows with 32-input groups."""
    n = data.shape[0]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(n, -1, type_size)
    halves = 2 if qtype == Q.Q4_1 else 1
    scales = blocks[..., : 2 * halves].copy().view(np.float16).astype(np.float32)  # [n, groups, halves]
    d = torch.from_numpy(scales[..., 0].copy())
    payload = blocks[..., 2 * halves :]
    if qtype == Q.Q8_0:
        codes = torch.from_numpy(payload.copy().view(np.int8)).reshape(n, -1)
        return QuantizedRows(codes, d, None, 8)
    nibbles = np.concatenate([payload & 15, payload >> 4], axis=-1)  # value j of the block at j
    codes = torch.from_numpy(nibbles.astype(np.uint8)).reshape(n, -1)
    zero = torch.from_numpy(scales[..., 1].copy()) if qtype == Q.Q4_1 else -8 * d
    return QuantizedRows(codes, d, zero, 4)


def _row_order(file_rows: np.ndarray, loaded: torch.Tensor) -> torch.Tensor:
    """For each loaded row, the index of a file row with the same float32 bits."""
    index: dict[bytes, list[int]] = {}
    for i, row in enumerate(file_rows):
        index.setdefault(row.tobytes(), []).append(i)
    order = []
    for row in loaded.detach().float().numpy():
        matches = index.get(row.tobytes())
        if not matches:
            raise QuantizationError("a GGUF tensor does not dequantize to the weights transformers loaded from it")
        order.append(matches.pop() if len(matches) > 1 else matches[0])
    return torch.tensor(order)


def gguf_linears(model: nn.Module, gguf_path: Path) -> dict[str, PanelLinear]:
    """The linear layers of `model` (a Llama-family model loaded from `gguf_path`) that the file holds in a runnable
    quantized type, by module name, as PanelLinear on the file's codes."""
    reader = gguf.GGUFReader(gguf_path)
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(
        reader.fields["general.architecture"].contents())
    tensors = {t.name: t for t in reader.tensors}
    config = model.config.get_text_config()
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers) if arch is not None else None
    found: dict[str, PanelLinear] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or names is None:
            continue
        tensor = tensors.get(f"{names.get_name(name)}.weight")
        if tensor is None and name == "lm_head" and config.tie_word_embeddings:
            tensor = tensors.get("token_embd.weight")
        if tensor is None or tensor.tensor_type not in RUNNABLE:
            continue
        data = np.asarray(tensor.data)
        rows = block_rows(data, tensor.tensor_type)
        order = _row_order(dequantize(data, tensor.tensor_type), module.weight)
        found[name] = PanelLinear(rows.take(order), module.bias)
    if not found:
        kinds = sorted({t.tensor_type.name for t in reader.tensors})
        raise QuantizationError(f"{gguf_path.name} carries no linear weights in {', '.join(RUNNABLE.values())} "
                                f"(its tensor types: {', '.join(kinds)}): load it without quantization, or quantize "
                                "at load with quantization='int8' or 'int4'")
    return found


def swap_gguf_linears(model: nn.Module, gguf_path: Path) -> int:
    """Swap the linear layers `gguf_path` holds quantized for PanelLinear on its codes; returns how many."""
    swapped = gguf_linears(model, gguf_path)
    for name, layer in swapped.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    logger.info("quantization='gguf': %d linear layers run on %s's codes", len(swapped), gguf_path.name)
    return len(swapped)
