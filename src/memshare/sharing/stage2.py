"""Stage 2: precise block-level filter. Normalized Euclidean similarity of cached K and V, per layer.

For blocks A and B, per layer: s_rel(X, Y) = 1 - ||X - Y|| / (||X|| + ||Y||) on the flattened block, taken
for keys (with RoPE undone, so position does not masquerade as content) and values apart and averaged;
the similarity is the mean over layers. Flattening all layers into one vector instead lets the larger,
alike-looking keys dominate and scores unrelated blocks as similar. `stage2="cosine"` (the ablation) takes the
cosine similarity in place of the normalized Euclidean one.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from memshare.engine.block_manager import BlockManager
from memshare.engine.policy import UnrotateKeys

STAGE2_METRICS = ("euclidean", "cosine")
# (physical block ids, first position of each block's KV, m) -> similarity [m, n - m] of the first m blocks with the
# rest. Where the KV cache lives decides how it is computed: here, or on vLLM's workers.
Scorer = Callable[[Sequence[int], Sequence[int], int], torch.Tensor]


def relative_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [L, m, F], y [L, n, F] -> [L, m, n] of 1 - ||x - y|| / (||x|| + ||y||)."""
    distance = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    norms = x.norm(dim=-1).unsqueeze(-1) + y.norm(dim=-1).unsqueeze(-2)
    return 1 - distance / norms.clamp_min(torch.finfo(x.dtype).tiny)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [L, m, F], y [L, n, F] -> [L, m, n] of cosine similarity (the stage-2 ablation)."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)


METRICS = {"euclidean": relative_similarity, "cosine": cosine_similarity}


def block_similarity(query_keys: torch.Tensor, query_values: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Similarity [m, n] of m query blocks with n blocks; inputs are [L, blocks, block_size, kv_heads, head_dim]
    with RoPE already undone on the keys. One vectorized pass over layers, heads and pairs."""
    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).float()

    similarity = METRICS[metric]
    key_sim = similarity(flat(query_keys), flat(keys))
    value_sim = similarity(flat(query_values), flat(values))
    return ((key_sim + value_sim) / 2).mean(0)


def read_blocks(block_manager: BlockManager, unrotate_keys: UnrotateKeys, block_ids: Sequence[int],
                first_positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K (RoPE undone) and V of physical blocks whose KV was written from `first_positions` on."""
    keys, values = block_manager.read_kv(block_ids)
    bs = block_manager.block_size
    positions = (torch.tensor(list(first_positions), device=keys.device).unsqueeze(1)
                 + torch.arange(bs, device=keys.device)).flatten()
    return unrotate_keys(keys.flatten(1, 2), positions).view_as(keys), values


def local_scorer(block_manager: BlockManager, unrotate_keys: UnrotateKeys, metric: str = "euclidean") -> Scorer:
    """Stage 2 over this process's KV cache."""
    def score(block_ids: Sequence[int], first_positions: Sequence[int], m: int) -> torch.Tensor:
        keys, values = read_blocks(block_manager, unrotate_keys, block_ids, first_positions)
        return block_similarity(keys[:, :m], values[:, :m], keys[:, m:], values[:, m:], metric)
    return score
