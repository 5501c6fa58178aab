"""The paged KV cache in any of its storage formats (`kv_cache_dtype`), written through a slot mapping and read
back dequantized.

Every format stores, per layer and for K and V apart, codes `[num_blocks, block_size, kv_heads, packed_dim]` and
optional float16 scales and zero points; a stored value is `lut[code] * scale + zero`. Scales are computed when a
token is written and stored beside its block, so a block's bytes (and so the block count a budget buys) follow
from the format alone:

- `auto` / `float32` / `bfloat16`: plain values, no scale.
- `fp8` (= `fp8_e4m3`), `fp8_e5m2`: a scale per token and KV head. vLLM keeps one scale per tensor, 1.0 without
  calibration data; at 1.0, 44% of smollm2's layer-0 values fall below e4m3's smallest normal number.
- `int8_per_token_head`, `int4_per_token_head` (vLLM's names): a symmetric scale per token and KV head.
- `int4_kivi` (KIVI, Liu et al. 2024): keys per channel over a block's tokens, values per token, both asymmetric.
  A key channel's range is known only when its block is full, so the newest, partial block of each sequence stays
  at 8 bits per token in a small tail pool (one block per running sequence, counted in the budget) and is
  quantized to 4 bits when it fills.
"""

from dataclasses import dataclass

import torch

from memshare.config import check_kv_cache_dtype
from memshare.errors import KVCacheDtypeError

SCALE_DTYPE = torch.float16


@dataclass(frozen=True, slots=True)
class KVFormat:
    name: str
    storage: torch.dtype
    bits: int  # 4: two codes per byte
    key_scales: str  # "none", "token" (one per token and head) or "channel" (one per channel, head and block)
    value_scales: str
    asymmetric: bool = False
    fp8: torch.dtype | None = None

    @property
    def quantized(self) -> bool:
        return self.bits <= 8

    @property
    def kernel_code(self) -> int:
        """The C++ decode kernel's name for how codes are stored (layers/cpu_kernels.py, enum Code)."""
        if self.fp8 is not None:
            return 3
        return {32: 0, 16: 1, 8: 2, 4: 4}[self.bits]

    @property
    def needs_tail(self) -> bool:
        return "channel" in (self.key_scales, self.value_scales)

    def lut(self, device: torch.device) -> torch.Tensor:
        """float32 [256]: the value of each code before scale and zero point."""
        codes = torch.arange(256, dtype=torch.int32)
        if self.fp8 is not None:
            lut = codes.to(torch.uint8).view(self.fp8).float()
        elif self.bits == 8:
            lut = codes.to(torch.uint8).view(torch.int8).float()
        else:
            lut = (codes - (0 if self.asymmetric else 8)).float()  # only codes 0..15 occur
        return lut.to(device)


FORMATS = {
    "float32": KVFormat("float32", torch.float32, 32, "none", "none"),
    "bfloat16": KVFormat("bfloat16", torch.bfloat16, 16, "none", "none"),
    "fp8_e4m3": KVFormat("fp8_e4m3", torch.uint8, 8, "token", "token", fp8=torch.float8_e4m3fn),
    "fp8_e5m2": KVFormat("fp8_e5m2", torch.uint8, 8, "token", "token", fp8=torch.float8_e5m2),
    "int8_per_token_head": KVFormat("int8_per_token_head", torch.uint8, 8, "token", "token"),
    "int4_per_token_head": KVFormat("int4_per_token_head", torch.uint8, 4, "token", "token"),
    "int4_kivi": KVFormat("int4_kivi", torch.uint8, 4, "channel", "token", asymmetric=True),
}


def kv_format(kv_cache_dtype: str, model_dtype: torch.dtype, head_dim: int | None = None) -> KVFormat:
    """The storage format of `kv_cache_dtype`; raises KVCacheDtypeError for unknown names or unpackable heads."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto":
        if model_dtype not in (torch.float32, torch.bfloat16):
            raise KVCacheDtypeError(f"no KV format for model dtype {model_dtype}; set kv_cache_dtype")
        return FORMATS[str(model_dtype).removeprefix("torch.")]
    fmt = FORMATS["fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype]
    if fmt.bits == 4 and head_dim is not None and head_dim % 2:
        raise KVCacheDtypeError(f"{kv_cache_dtype} packs two values per byte; head_dim {head_dim} is odd")
    return fmt


def _scale_shape(mode: str, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...] | None:
    return {"none": None, "token": (block_size, num_kv_heads), "channel": (num_kv_heads, head_dim)}[mode]


def block_bytes(fmt: KVFormat, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one block over all layers, K and V, codes with their scales and zero points."""
    codes = block_size * num_kv_heads * head_dim * fmt.bits // 8
    total = 0
    for mode in (fmt.key_scales, fmt.value_scales):
        shape = _scale_shape(mode, block_size, num_kv_heads, head_dim)
        scales = 0 if shape is None else shape[0] * shape[1] * SCALE_DTYPE.itemsize * (2 if fmt.asymmetric else 1)
        total += codes + scales
    return num_layers * total


@dataclass(slots=True)
class KVPlane:
    """K or V of one layer: codes [num_blocks, block_size, kv_heads, packed_dim], scale/zero or None."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    scale_mode: str


def _new_plane(fmt: KVFormat, mode: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               device: torch.device) -> KVPlane:
    codes = torch.zeros((num_blocks, block_size, num_kv_heads, head_dim * fmt.bits // (8 * fmt.storage.itemsize)),
                        dtype=fmt.storage, device=device)
    scale_shape = _scale_shape(mode, block_size, num_kv_heads, head_dim)
    scale = None if scale_shape is None else torch.zeros((num_blocks, *scale_shape), dtype=SCALE_DTYPE, device=device)
    zero = torch.zeros_like(scale) if scale is not None and fmt.asymmetric else None
    return KVPlane(codes, scale, zero, mode)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def _scale(raw: torch.Tensor) -> torch.Tensor:
    # As stored (float16), and never 0 (an all-zero row would divide by it): float16's smallest subnormal at least.
    return raw.to(SCALE_DTYPE).float().clamp_min(2**-24)


def quantize(fmt: KVFormat, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                   torch.Tensor | None]:
    """Codes, scale and zero point of x [..., n, kv_heads, head_dim]; `channel` scales reduce over n."""
    if not fmt.quantized:
        return x.to(fmt.storage), None, None
    x = x.float()
    dims = (-3,) if mode == "channel" else (-1,)
    squeeze = -3 if mode == "channel" else -1
    if fmt.fp8 is not None:
        limit = torch.finfo(fmt.fp8).max
        scale = _scale(x.abs().amax(dims, keepdim=True) / limit)
        # Saturated: the fp16-rounded scale may put the largest value just past the limit, where a cast gives NaN.
        codes = (x / scale).clamp(-limit, limit).to(fmt.fp8).view(torch.uint8)
        return codes, scale.squeeze(squeeze).to(SCALE_DTYPE), None
    levels = 2**fmt.bits - 1
    if fmt.asymmetric:
        low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        scale = _scale((high - low) / levels)
        zero = low.to(SCALE_DTYPE).float()
        codes = ((x - zero) / scale).round().clamp(0, levels).to(torch.uint8)
    else:
        half = levels // 2  # 127 or 7: symmetric around zero
        scale = _scale(x.abs().amax(dims, keepdim=True) / half)
        zero = None
        signed = (x / scale).round().clamp(-half, half)
        codes = (signed + 8).to(torch.uint8) if fmt.bits == 4 else signed.to(torch.int8).view(torch.uint8)
    if fmt.bits == 4:
        codes = _pack4(codes)
    return (codes, scale.squeeze(squeeze).to(SCALE_DTYPE),
            None if zero is None else zero.squeeze(squeeze).to(SCALE_DTYPE))


def dequantize(fmt: KVFormat, lut: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None,
               zero: torch.Tensor | None, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """Values [..., n, kv_heads, head_dim] of codes with their scale/zero ([..., n, heads] or [..., heads, dim])."""
    if not fmt.quantized:
        return codes.to(dtype)
    values = lut[(_unpack4(codes) if fmt.bits == 4 else codes).long()]
    if scale is not None:
        expand = scale.unsqueeze(-3) if mode == "channel" else scale.unsqueeze(-1)
        values = values * expand.float()
        if zero is not None:
            values = values + (zero.unsqueeze(-3) if mode == "channel" else zero.unsqueeze(-1)).float()
    return values.to(dtype)


class KVCache:
    """Every layer's K and V planes, written by the attention layers and read dequantized by everyone else."""

    def __init__(self, fmt: KVFormat, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, num_tail_blocks: int = 0) -> None:
        self.format, self.dtype, self.block_size = fmt, dtype, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.lut = fmt.lut(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers = [tuple(_new_plane(fmt, mode, *shape, device) for mode in (fmt.key_scales, fmt.value_scales))
                       for _ in range(num_layers)]
        self.tail = TailPool(num_tail_blocks if fmt.needs_tail else 0, num_layers, num_blocks,
                             (block_size, num_kv_heads, head_dim), device)
        self._kernel_args: list[list] | None = None
        # Every layer's K and V values in order where they are plain float32 (cpu_kernels' decode_layers writes them
        # itself); None for every other format.
        self.float32_planes = [p.codes for layer in self.layers for p in layer] if fmt.name == "float32" else None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tail_block_bytes(self) -> int:
        """Bytes of one tail block over all layers; 0 for formats without a tail."""
        if not self.format.needs_tail:
            return 0
        return TailPool.block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def num_tail_blocks_used(self) -> int:
        return len(self.tail.slots)

    def begin_step(self, slot_mapping: list[int]) -> None:
        """Plan this step's writes (the slots every layer will write); only formats with a tail need it."""
        if self.format.needs_tail:
            self.tail.plan(slot_mapping, self.block_size)

    def release(self, block_id: int) -> None:
        """The block's content is dead (freed with no reference left): drop its tail, if any."""
        if self.format.needs_tail:
            self.tail.release(block_id)

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value [T, kv_heads, head_dim] at their slots."""
        if self.format.needs_tail:
            self.tail.write(self, layer, key, value)
            return
        for plane, x in zip(self.layers[layer], (key, value)):
            codes, scale, _ = quantize(self.format, x, plane.scale_mode)
            plane.codes.view(-1, *plane.codes.shape[2:]).index_copy_(0, slot_mapping, codes)
            if scale is not None:
                plane.scale.view(-1, self.num_kv_heads).index_copy_(0, slot_mapping, scale)

    def store_blocks(self, layer: int, block_ids: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Quantize whole blocks key/value [n, block_size, kv_heads, head_dim] into `block_ids`."""
        for plane, x in zip(self.layers[layer], (key, value)):
            codes, scale, zero = quantize(self.format, x, plane.scale_mode)
            plane.codes.index_copy_(0, block_ids, codes)
            if scale is not None:
                plane.scale.index_copy_(0, block_ids, scale)
            if zero is not None:
                plane.zero.index_copy_(0, block_ids, zero)

    def copy_block(self, layer: int, source: int, target: int) -> None:
        """Copy a full block's stored K and V (codes, scales, zero points) of one layer."""
        for plane in self.layers[layer]:
            for tensor in (plane.codes, plane.scale, plane.zero):
                if tensor is not None:
                    tensor[target] = tensor[source]

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K, V of the blocks in `block_table` [..., n]: each [..., n * block_size, kv_heads, dim]."""
        flat = block_table.flatten()
        out = []
        for which, plane in enumerate(self.layers[layer]):
            scale, zero = (None if t is None else t.index_select(0, flat) for t in (plane.scale, plane.zero))
            values = dequantize(self.format, self.lut, plane.codes.index_select(0, flat), scale, zero,
                                plane.scale_mode, self.dtype)
            self.tail.overlay(layer, which, flat, values)
            out.append(values.view(*block_table.shape[:-1], -1, self.num_kv_heads, self.head_dim))
        return out[0], out[1]

    def read(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of physical blocks: each [num_layers, n, block_size, kv_heads, head_dim]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.lut.device)
        pairs = [self.gather(layer, index.unsqueeze(0)) for layer in range(self.num_layers)]
        shape = (len(block_ids), self.block_size, self.num_kv_heads, self.head_dim)
        return (torch.stack([k.view(shape) for k, _ in pairs]), torch.stack([v.view(shape) for _, v in pairs]))

    def kernel_args(self, layer: int) -> list:
        """The decode kernel's view of a layer: per plane codes, scale, zero, scale mode; then the lut and tails."""
        if self._kernel_args is None:  # the same tensors every step: built once
            self._kernel_args = [self._layer_kernel_args(i) for i in range(self.num_layers)]
        return self._kernel_args[layer]

    def _layer_kernel_args(self, layer: int) -> list:
        args: list = []
        modes = {"none": 0, "token": 1, "channel": 2}
        empty = self.lut.new_empty(0)
        for plane in self.layers[layer]:
            args += [plane.codes, empty if plane.scale is None else plane.scale,
                     empty if plane.zero is None else plane.zero, modes[plane.scale_mode]]
        return [*args, self.lut, self.format.kernel_code, *self.tail.kernel_args(layer)]


class TailPool:
    """The blocks still being filled, for formats whose scales need a whole block: held at 8 bits per token and
    KV head (int8_per_token_head, a rounding error a hundred times below 4-bit's), one block per running sequence.
    A token is quantized to 8 bits once, when written; its block is quantized to 4 bits once, when it fills."""

    format = FORMATS["int8_per_token_head"]

    def __init__(self, num_tail_blocks: int, num_layers: int, num_blocks: int, block_shape: tuple[int, int, int],
                 device: torch.device) -> None:
        self.lut = self.format.lut(device)
        shape = (num_tail_blocks, *block_shape)
        self.layers = [tuple(_new_plane(self.format, "token", *shape, device) for _ in "kv")
                       for _ in range(num_layers if num_tail_blocks else 0)]
        self.of_block = torch.full((num_blocks if num_tail_blocks else 0,), -1, dtype=torch.long, device=device)
        self.slots: dict[int, int] = {}  # block id -> tail index
        self.free = list(range(num_tail_blocks))[::-1]
        self.step: tuple | None = None

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        return block_bytes(TailPool.format, num_layers, block_size, num_kv_heads, head_dim)

    def release(self, block_id: int) -> None:
        tail = self.slots.pop(block_id, None)
        if tail is not None:
            self.free.append(tail)
            self.of_block[block_id] = -1

    def plan(self, slot_mapping: list[int], block_size: int) -> None:
        """Sort this step's tokens: those of blocks that stay partial go to their block's tail slot; the blocks that
        fill are assembled (earlier tokens from the tail, then this step's) and quantized whole."""
        last: dict[int, int] = {}  # block id -> last offset written
        for slot in slot_mapping:
            last[slot // block_size] = slot % block_size
        for block in {slot // block_size for slot in slot_mapping if slot % block_size == 0}:
            self.release(block)  # written from offset 0: a new block; whatever it held is dead
        full = [b for b, offset in last.items() if offset == block_size - 1]
        old_tails = {b: self.slots[b] for b in full if b in self.slots}
        for block in full:
            self.release(block)
        for block in last:
            if block not in full and block not in self.slots:
                if not self.free:
                    raise RuntimeError("KV tail pool exhausted: more partial blocks than running sequences")
                self.slots[block] = self.free.pop()
                self.of_block[block] = self.slots[block]
        row = {b: i for i, b in enumerate(full)}
        tail_tokens, tail_slots, full_tokens, full_slots = [], [], [], []
        for token, slot in enumerate(slot_mapping):
            block, offset = divmod(slot, block_size)
            if block in row:
                full_tokens.append(token)
                full_slots.append(row[block] * block_size + offset)
            else:
                tail_tokens.append(token)
                tail_slots.append(self.slots[block] * block_size + offset)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.of_block.device)

        self.step = (tensor(tail_tokens), tensor(tail_slots), tensor(full), tensor(full_tokens), tensor(full_slots),
                     tensor([row[b] for b in old_tails]), tensor(list(old_tails.values())))

    def write(self, cache: KVCache, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Tokens of partial blocks into their tail at 8 bits; blocks that fill quantized whole into the cache."""
        tail_tokens, tail_slots, full_blocks, full_tokens, full_slots, rows_with_tail, old_tails = self.step
        full = []
        for plane, x in zip(self.layers[layer], (key, value)):
            if len(full_blocks):  # first: a filled block's tail slot may be a new partial block's now
                rows = x.new_zeros((len(full_blocks), *plane.codes.shape[1:]))
                rows[rows_with_tail] = self._dequantize(plane, old_tails, x.dtype)
                rows.view(-1, *rows.shape[2:]).index_copy_(0, full_slots, x.index_select(0, full_tokens))
                full.append(rows)
            if len(tail_tokens):
                codes, scale, _ = quantize(self.format, x.index_select(0, tail_tokens), "token")
                plane.codes.view(-1, *plane.codes.shape[2:]).index_copy_(0, tail_slots, codes)
                plane.scale.view(-1, plane.scale.shape[-1]).index_copy_(0, tail_slots, scale)
        if full:
            cache.store_blocks(layer, full_blocks, *full)

    def _dequantize(self, plane: KVPlane, tails: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.format, self.lut, plane.codes[tails], plane.scale[tails], None, "token", dtype)

    def overlay(self, layer: int, which: int, block_ids: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the dequantized blocks that have a tail with their tail's values, in place."""
        if not self.slots:
            return
        tails = self.of_block[block_ids]
        rows = (tails >= 0).nonzero().flatten()
        if len(rows):
            plane = self.layers[layer][which]
            values.view(len(block_ids), -1, *values.shape[-2:])[rows] = self._dequantize(plane, tails[rows],
                                                                                         values.dtype)

    def kernel_args(self, layer: int) -> list:
        """Per plane the tail's int8 codes and per-token scales, then the tail index of every block."""
        if not self.layers:
            empty = self.of_block.new_empty(0)
            return [empty.byte(), empty.half(), empty.byte(), empty.half(), empty]
        (k, v) = self.layers[layer]
        return [k.codes, k.scale, v.codes, v.scale, self.of_block]
