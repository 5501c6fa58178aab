"""Paged attention plugged into Hugging Face model classes through transformers' attention registry.

The model runs on a flat batch: every scheduled token of every sequence in one row. Each layer first
writes the new keys and values into their cache slots, then every query attends to its own sequence's
context read through the block table. Writing before reading lets a sequence attend to blocks another
sequence of the same batch is filling (a prefix-cache hit or a fork in the same step).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from memshare.layers.cpu_kernels import cpu_ops, kernel_applies
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
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # [num_decodes]
    prefills: list[PrefillSpan]


@dataclass(slots=True)
class PagedContext:
    kv_cache: KVCache
    metadata: AttentionMetadata
    decode_queries: list[torch.Tensor] | None = None  # per layer, filled when an eviction policy scores attention


def decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """q: [B, heads, head_dim] for B single-token decodes -> [B, heads, head_dim].

    On CPU in float32, the fused kernel, which dequantizes each row as it reads it; elsewhere one bmm per KV
    head on the gathered, dequantized blocks (no copy to a heads-first layout, none of SDPA's per-call overhead at
    one query token).
    """
    if kernel_applies(q):
        with torch.profiler.record_function("memshare::paged_decode"):  # named in profiles (bench/decode_profile.py)
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
    cache.write(layer_idx, meta.slot_mapping, key, value)
    if paged.decode_queries is not None:
        paged.decode_queries.append(q[: meta.num_decodes].clone())
    if not meta.prefills:
        return decode_attention(q, cache, layer_idx, meta, scale)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = decode_attention(q[: meta.num_decodes], cache, layer_idx, meta, scale)
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
