"""Where vLLM 0.32 keeps the K and V of a block, and reading given blocks from it by logical indexing.

vLLM 0.32 views every attention layer's cache as a logical `[kernel blocks, kv_heads, tokens, content]` tensor over
one raw allocation; the KV-cache layout (`VLLM_KV_CACHE_LAYOUT`: LBHNC, LBNHC, ...: HND or NHD) only sets its
strides, and a scheduler block may be split into several kernel blocks. Indexing the logical view is right for every
stride order, so nothing here looks at strides. What differs between backends is the inside of one (block, head)
cell: GPU backends (FlashAttention, FlashInfer, Triton, FlexAttention) put K then V on the content axis; CPU
attention's kernels lay both out in an order of their own per ISA (vec, vec16, amx, ...), which `CellLayout.probe`
learns by writing a known pattern through vLLM's own reshape-and-cache op. Pure torch: vLLM hands in the pieces.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Written as digit + 1 in base 8: 1..8 are exact in every KV dtype (fp8 e5m2 included) and 0 marks "not written".
_BASE = 8


@dataclass(frozen=True, slots=True)
class CellLayout:
    """Where K[t, d] and V[t, d] of one kernel block's (block, head) cell sit among its `tokens * content`
    elements, flattened in logical order."""

    key_index: torch.Tensor  # [tokens, head_size] int64
    value_index: torch.Tensor  # [tokens, head_size_v] int64

    @classmethod
    def split_content(cls, tokens: int, head_size: int, head_size_v: int) -> "CellLayout":
        """GPU backends: token t's content is K (head_size) then V (head_size_v)."""
        content = head_size + head_size_v
        rows = torch.arange(tokens).unsqueeze(1) * content
        return cls(rows + torch.arange(head_size), rows + head_size + torch.arange(head_size_v))

    @classmethod
    def probe(cls, write: Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor],
              read_cell: Callable[[torch.Tensor], torch.Tensor], cell_shape: tuple[int, int, int, int],
              head_size: int) -> "CellLayout":
        """Learn a kernel's cell layout from the kernel itself.

        `write(key, value, cell_shape)` stores key/value [tokens, 1, head_size] through the kernel into a zeroed
        one-block, one-head cache of `cell_shape` and returns it; `read_cell(cache)` returns its `tokens * content`
        elements as float32. Each element's (token, dim) is written in base-8 digits over a few passes, K and V
        apart."""
        tokens = cell_shape[2]
        codes = torch.arange(tokens * head_size).view(tokens, 1, head_size)
        passes = max(1, math.ceil(math.log(tokens * head_size, _BASE)))

        def locate(is_key: bool) -> torch.Tensor:
            found = torch.zeros(math.prod(cell_shape[2:]), dtype=torch.long)
            written = None
            for p in range(passes):
                digits = (codes // _BASE**p % _BASE + 1).float()
                zeros = torch.zeros_like(digits)
                cell = read_cell(write(digits, zeros, cell_shape) if is_key else write(zeros, digits, cell_shape))
                written = cell != 0 if written is None else written
                if not torch.equal(written, cell != 0):
                    raise ValueError("the kernel's cache layout is not a fixed permutation of (token, dim)")
                found += (cell.round().long() - 1).clamp_min(0) * _BASE**p
            positions = written.nonzero().squeeze(1)
            index = torch.full((tokens * head_size,), -1, dtype=torch.long)
            index[found[positions]] = positions
            if len(positions) != tokens * head_size or (index < 0).any():
                raise ValueError("the kernel's cache layout does not hold each (token, dim) exactly once")
            return index.view(tokens, head_size)

        return cls(locate(True), locate(False))


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One layer's cache as the worker holds it, and how to read given scheduler blocks from it."""

    name: str
    cache: torch.Tensor  # logical [num_blocks * kernel_blocks_per_block, kv_heads, kernel_tokens, content]
    num_blocks: int  # scheduler blocks
    cell: CellLayout
    fp8_dtype: torch.dtype | None = None  # the storage (uint8) holds this fp8 format
    k_scale: float = 1.0
    v_scale: float = 1.0

    def read(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of scheduler blocks, each [blocks, block_size, kv_heads, head_dim] float32 on the cache's device."""
        grouped = self.cache.unflatten(0, (self.num_blocks, -1))  # [blocks, kernel blocks, H, T, C]
        cells = grouped.index_select(0, block_ids.to(self.cache.device)).flatten(-2)
        if self.fp8_dtype is not None:
            cells = cells.view(self.fp8_dtype)
        cells = cells.float()
        keys = cells[..., self.cell.key_index.to(cells.device)] * self.k_scale
        values = cells[..., self.cell.value_index.to(cells.device)] * self.v_scale
        return (self._tokens_first(keys), self._tokens_first(values))

    @staticmethod
    def _tokens_first(x: torch.Tensor) -> torch.Tensor:
        # [blocks, kernel blocks, H, T, D] -> [blocks, kernel blocks * T, H, D]
        return x.permute(0, 1, 3, 2, 4).flatten(1, 2)


def distinct_storages(layers: list[LayerKV], aliases: dict[str, str | None]) -> list[LayerKV]:
    """The layers that own their cache: a layer reading another layer's cache (`kv_sharing_target_layer_name`)
    would count that storage twice in the similarity."""
    return [layer for layer in layers if aliases.get(layer.name) is None]


def owns_kv_heads(tp_rank: int, tp_size: int, total_kv_heads: int) -> bool:
    """With more tensor-parallel ranks than KV heads each head is replicated on tp_size / total_kv_heads adjacent
    ranks (vLLM's QKV split): only the first of them counts the head."""
    replicas = max(1, tp_size // total_kv_heads)
    return tp_rank % replicas == 0
