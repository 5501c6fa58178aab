"""What runs on vLLM's workers, where the KV cache lives: stage 2 of MemShare and the start-up checks.

Each function takes the worker as its first argument and is sent by `collective_rpc` (by reference: this
module is importable in every worker process).
"""

from typing import Any

import torch

from memshare.layers.rotary import unrotate_neox
from memshare.sharing.stage2 import block_similarity
from memshare.vllm_plugin import _vllm_api as api


def check(worker: Any) -> list[str]:
    """Reasons this worker's KV cache cannot be read by stage 2 (empty: it can)."""
    problems = []
    isa = api.attention_isa(worker)
    if isa != "vec":
        problems.append(f"attention kernel {isa!r}: only the CPU 'vec' layout "
                        "(float32/float16 KV, block size a multiple of 32) is read by stage 2")
    rope = api.rotary(worker)
    if rope is not None and not rope.is_neox_style:
        problems.append("GPT-J-style (interleaved) rotary embeddings")
    return problems


def unrotate_keys(worker: Any, keys: torch.Tensor, first_positions: list[int]) -> torch.Tensor:
    """keys [layers, blocks, block_size, heads, head_dim] with the RoPE rotation of their positions undone."""
    rope = api.rotary(worker)
    if rope is None:
        return keys
    bs = keys.shape[2]
    positions = (torch.tensor(first_positions).unsqueeze(1) + torch.arange(bs)).flatten()
    cos, sin = rope.cos_sin_cache.index_select(0, positions.to(rope.cos_sin_cache.device)).float().cpu().chunk(2, -1)
    shape = (1, len(first_positions), bs, 1, -1)
    return unrotate_neox(keys, cos.view(shape), sin.view(shape))


def score_blocks(worker: Any, block_ids: list[int], first_positions: list[int], m: int, metric: str) -> torch.Tensor:
    """Stage-2 similarity [m, n - m] of the first m blocks with the others, read from this worker's cache."""
    keys, values = api.read_kv(worker, block_ids)
    keys = unrotate_keys(worker, keys, first_positions)
    return block_similarity(keys[:, :m], values[:, :m], keys[:, m:], values[:, m:], metric)
