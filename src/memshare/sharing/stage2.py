"""Stage 2: precise block-level filter. Normalized Euclidean similarity of cached K and V, per layer.

For blocks A and B, per layer: s_rel(X, Y) = 1 - ||X - Y|| / (||X|| + ||Y||) on the flattened block, taken
for keys (with RoPE undone, so position does not masquerade as content) and values apart and averaged;
the similarity is the mean over layers. Flattening all layers into one vector instead lets the larger,
alike-looking keys dominate and scores unrelated blocks as similar. `stage2="cosine"` (the ablation) takes the
cosine similarity in place of the normalized Euclidean one.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from memshare.engine.policy import KVBlockOps, UnrotateKeys

# (physical block ids, first position of each block's KV, m) -> similarity [m, n - m] of the first m blocks with the
# rest. Where the KV cache lives decides how it is computed: here, or on vLLM's workers.
Scorer = Callable[[Sequence[int], Sequence[int], int], torch.Tensor]


def relative_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [L, m, F], y [L, n, F] -> [L, m, n] of 1 - ||x - y|| / (||x|| + ||y||)."""
    distance = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    norms = x.norm(dim=-1).unsqueeze(-1) + y.norm(dim=-1).unsqueeze(-2)
    return 1 - distance / norms.clamp_min(torch.finfo(x.dtype).tiny)


@dataclass(slots=True)
class PartialSums:
    """The sums a stage-2 similarity is formed from, over some KV heads of some layers, for K and V apart.

    Sums of one layer over disjoint heads add up (tensor parallelism); distinct layers stack (pipeline stages,
    layers aliasing another's cache are left out by the reader). So each rank sends these few numbers, not its KV."""

    layers: tuple[str, ...]
    cross: torch.Tensor  # [L, 2, m, n]: ||x - y||^2 (euclidean) or x . y (cosine); index 1: K, V
    query_sq: torch.Tensor  # [L, 2, m]: ||x||^2
    key_sq: torch.Tensor  # [L, 2, n]: ||y||^2


def partial_sums(query_keys: torch.Tensor, query_values: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 metric: str = "euclidean", layers: Sequence[str] | None = None) -> PartialSums:
    """Sums of m query blocks against n blocks; inputs [L, blocks, block_size, kv_heads, head_dim], RoPE undone."""
    def pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = x.flatten(2).float(), y.flatten(2).float()
        if metric == "euclidean":
            cross = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square()
        else:
            cross = x @ y.transpose(1, 2)
        return cross, x.square().sum(-1), y.square().sum(-1)

    cross, query_sq, key_sq = (torch.stack(kv, 1) for kv in zip(pair(query_keys, keys), pair(query_values, values)))
    names = tuple(layers) if layers is not None else tuple(str(i) for i in range(cross.shape[0]))
    return PartialSums(names, cross, query_sq, key_sq)


def combine(parts: Iterable[PartialSums]) -> PartialSums:
    """One layer's sums from several parts added, distinct layers stacked in first-seen order."""
    total: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for i, name in enumerate(part.layers):
            pieces = [part.cross[i], part.query_sq[i], part.key_sq[i]]
            total[name] = [a + b for a, b in zip(total[name], pieces)] if name in total else pieces
    if not total:
        raise ValueError("no partial sums to combine: no rank returned a layer")
    cross, query_sq, key_sq = (torch.stack([pieces[j] for pieces in total.values()]) for j in range(3))
    return PartialSums(tuple(total), cross, query_sq, key_sq)


def similarity(sums: PartialSums, metric: str = "euclidean") -> torch.Tensor:
    """[m, n]: per layer the mean of K's and V's similarity, then the mean over layers."""
    query_norm, key_norm = sums.query_sq.sqrt().unsqueeze(-1), sums.key_sq.sqrt().unsqueeze(-2)
    tiny = torch.finfo(sums.cross.dtype).tiny
    if metric == "euclidean":
        per_layer = 1 - sums.cross.clamp_min(0).sqrt() / (query_norm + key_norm).clamp_min(tiny)
    else:
        per_layer = sums.cross / (query_norm * key_norm).clamp_min(tiny)
    return per_layer.mean(1).mean(0)


def block_similarity(query_keys: torch.Tensor, query_values: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Similarity [m, n] of m query blocks with n blocks; inputs are [L, blocks, block_size, kv_heads, head_dim]
    with RoPE already undone on the keys. One vectorized pass over layers, heads and pairs."""
    return similarity(partial_sums(query_keys, query_values, keys, values, metric), metric)


def read_blocks(block_manager: KVBlockOps, unrotate_keys: UnrotateKeys, block_ids: Sequence[int],
                first_positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K (RoPE undone) and V of physical blocks whose KV was written from `first_positions` on."""
    keys, values = block_manager.read_kv(block_ids)
    bs = block_manager.block_size
    positions = (torch.tensor(list(first_positions), device=keys.device).unsqueeze(1)
                 + torch.arange(bs, device=keys.device)).flatten()
    return unrotate_keys(keys.flatten(1, 2), positions).view_as(keys), values


def local_scorer(block_manager: KVBlockOps, unrotate_keys: UnrotateKeys, metric: str = "euclidean") -> Scorer:
    """Stage 2 over this process's KV cache."""
    def score(block_ids: Sequence[int], first_positions: Sequence[int], m: int) -> torch.Tensor:
        keys, values = read_blocks(block_manager, unrotate_keys, block_ids, first_positions)
        return block_similarity(keys[:, :m], values[:, :m], keys[:, m:], values[:, m:], metric)
    return score
