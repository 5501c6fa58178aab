"""KV eviction baselines in the same block pool: StreamingLLM, H2O and R-KV, at block granularity.

Each keeps at most `kv_budget` blocks of a request's generated region (a budget below 1 is the fraction of
the generated blocks kept) and frees the rest through `BlockManager.evict`, which drops them from the block
table. The prompt is never evicted (its first tokens are StreamingLLM's attention sinks) and the last entry,
which the next token is written to or after, is always kept. Scores are per block, summed over layers and
heads, because a freed block frees every layer at once.

Remap (`remap_threshold` <= 1, issue 20's MemShare variant): a given-up block whose MemShare stage-2 similarity
with an earlier kept block reaches the threshold is shared with that block (`BlockManager.share`) instead of
evicted. It frees the same memory; attention sees the similar block where eviction shows it nothing.
"""

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from memshare.config import register_policy
from memshare.engine.policy import KVBlockOps, ModelAccess, PolicyRequest, SharingPolicy, first_holders
from memshare.sharing.configs import H2OConfig, RKVConfig, StreamingLLMConfig
from memshare.sharing.stage2 import local_scorer

RKV_OBSERVATION_WINDOW = 8  # R-KV scores importance with the attention of the last 8 queries


@dataclass(slots=True)
class EvictionState:
    preemptions: int
    positions: list[int] = field(default_factory=list)  # position of the first token of each table entry
    origins: list[int] = field(default_factory=list)  # position its KV was written at (a remapped entry: its source's)
    queries: deque = field(default_factory=deque)  # (position, [layers, heads, head_dim]) not yet scored
    scores: list[float] = field(default_factory=list)  # H2O: accumulated attention of each entry
    compressed_at: int = 0  # R-KV: output length at the last compression


class EvictionPolicy(SharingPolicy):
    """StreamingLLM: the most recent generated blocks fill the whole budget."""

    def __init__(self, config: StreamingLLMConfig, block_manager: KVBlockOps, model: ModelAccess) -> None:
        super().__init__(config, block_manager, model)
        self.block_size = block_manager.block_size
        self.states: dict[int, EvictionState] = {}
        self.blocks_evicted = 0
        self.blocks_shared = 0
        self.score = local_scorer(block_manager, model.unrotate_keys) if config.remap_threshold <= 1 else None

    def observe(self, seq: PolicyRequest, query: torch.Tensor) -> None:
        """The query [layers, heads, head_dim] of `seq`'s latest decoded token (for attention-based scores)."""
        self._state(seq).queries.append((seq.num_computed_tokens - 1, query))

    def after_step(self, running: list[PolicyRequest]) -> None:
        for seq in running:
            if seq.num_computed_tokens != seq.num_tokens - 1:
                continue  # prefilling or recomputing: only a decoding sequence is compressed
            state = self._state(seq)
            first = self.first_generated_block(seq)
            owned = self._owned(seq, first)
            limit = self.limit(seq, len(seq.block_table) - first)
            if len(owned) > limit and self.due(seq, state):
                keep = set(self.select(seq, state, owned, limit))
                self._give_up(seq, state, [i for i in owned if i not in keep])

    def limit(self, seq: PolicyRequest, generated: int) -> int:
        budget = self.config.kv_budget
        if budget >= 1:
            return int(budget)
        return max(1, math.ceil(budget * (generated + seq.num_evicted_tokens // self.block_size)))

    def due(self, seq: PolicyRequest, state: EvictionState) -> bool:
        return True

    def select(self, seq: PolicyRequest, state: EvictionState, owned: list[int], limit: int) -> list[int]:
        """Entries of `owned` (generated, holding their own block) to keep, `limit` of them including the last."""
        return owned[-limit:]

    def finish(self, seq: PolicyRequest) -> None:
        super().finish(seq)
        self.states.pop(seq.seq_id, None)

    def stats(self) -> dict[str, float | int]:
        return super().stats() | {"blocks_evicted": self.blocks_evicted, "blocks_shared": self.blocks_shared}

    def _state(self, seq: PolicyRequest) -> EvictionState:
        state = self.states.get(seq.seq_id)
        if state is None or state.preemptions != seq.num_preemptions:
            # New, or recomputed after preemption: every block is back at its own position.
            state = self.states[seq.seq_id] = EvictionState(seq.num_preemptions,
                                                            compressed_at=seq.num_output_tokens)
        while len(state.positions) < len(seq.block_table):
            state.positions.append(state.positions[-1] + self.block_size if state.positions else 0)
            state.origins.append(state.positions[-1])
            state.scores.append(0.0)
        return state

    @staticmethod
    def _owned(seq: PolicyRequest, first: int) -> list[int]:
        # Remapped entries hold no block of their own: they neither count against the budget nor free anything.
        holders = first_holders(seq.block_table)
        return [i for i in range(first, len(seq.block_table)) if holders[seq.block_table[i]] == i]

    def _give_up(self, seq: PolicyRequest, state: EvictionState, indices: list[int]) -> None:
        remapped = self._remap(seq, state, indices) if self.score is not None else set()
        self._evict(seq, state, [i for i in indices if i not in remapped])
        state.compressed_at = seq.num_output_tokens

    def _remap(self, seq: PolicyRequest, state: EvictionState, indices: list[int]) -> set[int]:
        """Share each given-up entry with its most similar earlier kept entry at or above `remap_threshold`."""
        table, given = seq.block_table, set(indices)
        last = len(table) - 1  # still being written
        sources = sorted(i for i in first_holders(table).values() if i not in given and i != last)
        if not sources:
            return set()
        entries = indices + sources
        similarity = self.score([table[e] for e in entries], [state.origins[e] for e in entries], len(indices))
        later = torch.tensor(sources).unsqueeze(0) >= torch.tensor(indices).unsqueeze(1)
        best, column = similarity.masked_fill(later, -1.0).max(dim=1)
        remapped = set()
        for index, score, j in zip(indices, best.tolist(), column.tolist()):
            if score >= self.config.remap_threshold:
                self.block_manager.share(seq, index, sources[j])
                state.origins[index] = state.origins[sources[j]]
                remapped.add(index)
        self.blocks_shared += len(remapped)
        return remapped

    def _evict(self, seq: PolicyRequest, state: EvictionState, indices: list[int]) -> None:
        self.block_manager.evict(seq, indices)
        dropped = set(indices)
        state.positions = [p for i, p in enumerate(state.positions) if i not in dropped]
        state.origins = [p for i, p in enumerate(state.origins) if i not in dropped]
        state.scores = [s for i, s in enumerate(state.scores) if i not in dropped]
        self.blocks_evicted += len(indices)

    def attention(self, seq: PolicyRequest, state: EvictionState,
                  queries: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Attention of `queries` to each table entry [entries], summed over queries, layers and heads."""
        keys, _ = self.block_manager.read_kv(seq.block_table)  # [layers, entries, bs, kv_heads, dim]
        layers, entries, bs, kv_heads, dim = keys.shape
        q = torch.stack([query for _, query in queries], dim=1).float()  # [layers, m, heads, dim]
        q = q.view(layers, len(queries), kv_heads, -1, dim)
        logits = torch.einsum("lmkgd,ltkd->lmkgt", q, keys.flatten(1, 2).float()) * dim**-0.5
        key_pos = (torch.tensor(state.positions).unsqueeze(1) + torch.arange(bs)).flatten()
        query_pos = torch.tensor([p for p, _ in queries])
        # A query sees the tokens up to its own position; slots past the written ones hold stale KV.
        hidden = key_pos.view(1, 1, 1, 1, -1) > query_pos.view(1, -1, 1, 1, 1)
        probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
        return probs.sum((0, 1, 2, 3)).view(entries, bs).sum(1)


class H2OPolicy(EvictionPolicy):
    """H2O: a recent window (`recent_fraction` of the budget) plus the heavy hitters by accumulated attention."""

    needs_queries = True

    def observe(self, seq: PolicyRequest, query: torch.Tensor) -> None:
        super().observe(seq, query)
        state = self.states[seq.seq_id]
        if len(state.queries) >= self.block_size:  # score in batches: buffered queries cost memory
            self._accumulate(seq, state)

    def select(self, seq: PolicyRequest, state: EvictionState, owned: list[int], limit: int) -> list[int]:
        self._accumulate(seq, state)
        recent = max(1, round(limit * self.config.recent_fraction))
        heavy = sorted(owned[:-recent], key=lambda i: -state.scores[i])[: limit - recent]
        return heavy + owned[-recent:]

    def _accumulate(self, seq: PolicyRequest, state: EvictionState) -> None:
        if state.queries:
            attention = self.attention(seq, state, list(state.queries)).tolist()
            state.scores = [s + a for s, a in zip(state.scores, attention)]
            state.queries.clear()


class RKVPolicy(EvictionPolicy):
    """R-KV: every `compress_interval` tokens, keep the blocks with the best attention importance minus key
    redundancy (weight `rkv_lambda` on importance), plus the block being written."""

    needs_queries = True

    def observe(self, seq: PolicyRequest, query: torch.Tensor) -> None:
        super().observe(seq, query)
        state = self.states[seq.seq_id]
        while len(state.queries) > RKV_OBSERVATION_WINDOW:
            state.queries.popleft()

    def due(self, seq: PolicyRequest, state: EvictionState) -> bool:
        return seq.num_output_tokens - state.compressed_at >= self.config.compress_interval

    def select(self, seq: PolicyRequest, state: EvictionState, owned: list[int], limit: int) -> list[int]:
        candidates = owned[:-1]
        importance = self.attention(seq, state, list(state.queries))[candidates] if state.queries else \
            torch.zeros(len(candidates))
        importance = importance / importance.sum().clamp_min(1e-12)
        redundancy = self._redundancy([seq.block_table[i] for i in candidates]).softmax(0)
        lam = self.config.rkv_lambda
        score = lam * importance - (1 - lam) * redundancy
        best = score.topk(limit - 1).indices.tolist() if limit > 1 else []
        return [candidates[i] for i in best] + owned[-1:]

    def _redundancy(self, block_ids: list[int]) -> torch.Tensor:
        """Mean cosine similarity of each block's keys with the other blocks', averaged over layers."""
        keys, _ = self.block_manager.read_kv(block_ids)
        flat = torch.nn.functional.normalize(keys.flatten(2).float(), dim=-1)  # [layers, n, features]
        similarity = (flat @ flat.transpose(1, 2)).mean(0)
        n = similarity.shape[0]
        return (similarity.sum(1) - similarity.diagonal()) / max(n - 1, 1)


def _keep_fraction(memshare_affected_ratio: float) -> float:
    # At MemShare's memory: keep the fraction of generated blocks MemShare did not share.
    return min(max(1 - memshare_affected_ratio, 1e-3), 0.999)


for _config, _policy in ((StreamingLLMConfig, EvictionPolicy), (H2OConfig, H2OPolicy), (RKVConfig, RKVPolicy)):
    register_policy(_config, _policy, knobs=("kv_budget",), match={"kv_budget": _keep_fraction})
