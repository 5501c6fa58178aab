"""Paged attention plugged into Hugging Face model classes through transformers' attention registry.

The model runs on a flat batch: every scheduled token of every sequence in one row. Each layer first
writes the new keys and values into their cache slots, then every query attends to its own sequence's
context read through the block table. Writing before reading lets a sequence attend to blocks another
sequence of the same batch is filling (a prefix-cache hit or a fork in the same step).
"""

import importlib
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from memshare.layers.cpu_kernels import cpu_ops, kernel_applies, kernel_range
from memshare.layers.kv_cache import KVCache

ATTN_IMPLEMENTATION = "memshare_paged"


@dataclass(slots=True)
class PrefillSpan:
    query_start: int
    query_end: int
    context_len: int
    block_table: torch.Tensor
    mask: torch.Tensor | None  # None: plain causal attention over a prompt with nothing cached


@dataclass(slots=True)
class VarlenMetadata:
    """The whole batch as the Triton kernel reads it (layers/triton_attention.py): sequence i owns query rows
    query_start[i]:query_start[i + 1], the last of its seq_lens[i] positions, read through block_tables[i]."""

    query_start: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    tile_seq: torch.Tensor  # [num_tiles] int32: the sequence of each program tile
    tile_q0: torch.Tensor  # [num_tiles] int32: its first query
    block_q: int
    num_splits: int


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # [num_decodes]
    prefills: list[PrefillSpan]
    varlen: VarlenMetadata | None = None  # built for the Triton backend only


@dataclass(slots=True)
class PagedContext:
    kv_cache: KVCache
    metadata: AttentionMetadata
    decode_queries: list[torch.Tensor] | None = None  # per layer, filled when an eviction policy scores attention
    backend: str = "cpu"  # resolved by `attention_backend`: "cpu", "triton" or "torch"


@cache
def triton_ops() -> ModuleType:
    """layers/triton_attention.py, imported on first use: Triton is needed only by the Triton backend."""
    return importlib.import_module("memshare.layers.triton_attention")


def attention_backend(name: str, device: torch.device) -> str:
    """The backend `name` ("auto", "triton", "torch") runs on `device`; raises ValueError where it cannot run."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("attention_backend='triton' needs the triton package: pip install triton")
        import triton

        if device.type == "cpu" and not triton.knobs.runtime.interpret:
            raise ValueError("attention_backend='triton' on CPU runs only under Triton's interpreter: start the "
                             "process with TRITON_INTERPRET=1 (slow; for checking the kernels)")
    return name


def decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata,
                     scale: float, use_kernel: bool = True) -> torch.Tensor:
    """q: [B, heads, head_dim] for B single-token decodes -> [B, heads, head_dim].

    On CPU in float32, the fused kernel, which dequantizes each row as it reads it; elsewhere one bmm per KV
    head on the gathered, dequantized blocks (no copy to a heads-first layout, none of SDPA's per-call overhead at
    one query token).
    """
    if use_kernel and kernel_applies(q):
        with kernel_range(lambda: "memshare::paged_decode"):
            return cpu_ops().paged_decode(q, *cache.kernel_args(layer), meta.decode_block_tables,
                                          meta.decode_context_lens, scale)
    keys, values = cache.gather(layer, meta.decode_block_tables)  # [B, L, kv_heads, d]
    num_kv_heads = keys.shape[2]
    padding = torch.arange(keys.shape[1], device=q.device) >= meta.decode_context_lens.unsqueeze(1)
    padding = padding.unsqueeze(1)  # [B, 1, L]: True past each sequence's context
    q = q.view(q.shape[0], num_kv_heads, -1, q.shape[2]) * scale  # [B, kv_heads, group, d]
    out = torch.empty_like(q)
    for h in range(num_kv_heads):
        scores = torch.bmm(q[:, h], keys[:, :, h].transpose(1, 2))  # [B, group, L]
        scores.masked_fill_(padding, float("-inf"))
        torch.bmm(scores.softmax(dim=-1), values[:, :, h], out=out[:, h])
    return out.flatten(1, 2)


def prefill_attention(q: torch.Tensor, cache: KVCache, layer: int, span: PrefillSpan, scale: float) -> torch.Tensor:
    """q: [n, heads, head_dim] for n consecutive tokens of one sequence -> [n, heads, head_dim]."""
    group = q.shape[1] // cache.num_kv_heads
    keys, values = cache.gather(layer, span.block_table)
    # Heads repeated explicitly: SDPA's CPU flash kernel does not take grouped KV heads.
    keys = keys[: span.context_len].repeat_interleave(group, dim=1).transpose(0, 1)
    values = values[: span.context_len].repeat_interleave(group, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=span.mask,
                                         is_causal=span.mask is None, scale=scale)
    return out.transpose(0, 1)


def paged_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int, paged: PagedContext,
                    scale: float) -> torch.Tensor:
    """One layer over the flat batch: q [T, heads, d], key/value [T, kv_heads, d] after RoPE -> [T, heads, d].

    Writes the new keys and values into their cache slots first, then attends through the block tables.
    """
    cache, meta = paged.kv_cache, paged.metadata
    if paged.backend == "triton":
        triton_ops().store_kv(cache, layer_idx, meta.slot_mapping, key, value)
    else:
        cache.write(layer_idx, meta.slot_mapping, key, value)
    if paged.decode_queries is not None:
        paged.decode_queries.append(q[: meta.num_decodes].clone())
    if paged.backend == "triton":
        v = meta.varlen
        return triton_ops().paged_attention(q, cache, layer_idx, v.query_start, v.seq_lens, v.block_tables,
                                            v.tile_seq, v.tile_q0, v.block_q, scale, v.num_splits)
    use_kernel = paged.backend == "cpu"
    if not meta.prefills:
        return decode_attention(q, cache, layer_idx, meta, scale, use_kernel)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = decode_attention(q[: meta.num_decodes], cache, layer_idx, meta, scale, use_kernel)
    for span in meta.prefills:
        out[span.query_start : span.query_end] = prefill_attention(
            q[span.query_start : span.query_end], cache, layer_idx, span, scale)
    return out


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, paged: PagedContext | None = None, **kwargs):
    """transformers attention function: query [1, heads, T, d], key/value [1, kv_heads, T, d] after RoPE."""
    if paged is None:
        raise RuntimeError("memshare paged attention called without a PagedContext (run the model via memshare)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                          module.layer_idx, paged, scale)
    return out.unsqueeze(0), None


def register_paged_attention() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
