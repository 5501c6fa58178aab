from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from memshare.engine.sequence import Sequence
from memshare.layers.kv_cache import KVCache


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    # The exact key behind block_hash, compared on every hit so a hash collision never shares wrong KV.
    hash_key: tuple | None = None


class BlockManager:
    """Pool of KV blocks with reference counts, a free queue, and per-sequence block tables.

    A block is referenced once per block-table entry pointing at it. Freed blocks whose content is a
    full prompt block keep their hash in the free queue, so a later request with the same prefix can
    reuse them (automatic prefix caching) until the block is evicted for new content.

    `share` points a full block-table entry at an earlier entry's physical block and releases the duplicate:
    MemShare's zero-copy reuse. `read_kv` is the read-only view of the cache that similarity measures use.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 kv_cache: KVCache | None = None) -> None:
        self.block_size = block_size
        self.kv_cache = kv_cache
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered dict as an LRU free queue: O(1) pop from the front and removal from the middle.
        self.free_queue: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash_key(self, seq: Sequence, index: int, parent_hash: int | None) -> tuple:
        tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
        return (parent_hash, tokens)

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of `seq`'s prompt (never its last token, which must be run)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent_hash = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            key = self._hash_key(seq, index, parent_hash)
            block_id = self.hash_to_block.get(hash(key))
            if block_id is None or self.blocks[block_id].hash_key != key:
                break
            hits.append(block_id)
            parent_hash = hash(key)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: Seq[int] = ()) -> bool:
        """Give `seq` the blocks to hold `num_new_tokens` more tokens; False (and no change) if they don't fit."""
        computed_blocks = list(computed_blocks)
        num_free_computed = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        num_total = self.blocks_needed(seq.num_cached_kv_tokens + len(computed_blocks) * self.block_size
                                       + num_new_tokens)
        num_new_blocks = num_total - len(seq.block_table) - len(computed_blocks)
        if num_new_blocks + num_free_computed > self.num_free_blocks:
            return False
        for block_id in computed_blocks:
            self._touch(block_id)
        seq.block_table.extend(computed_blocks)
        cached = len(computed_blocks) * self.block_size
        seq.num_computed_tokens += cached
        seq.num_cached_tokens += cached
        seq.block_table.extend(self._pop_free() for _ in range(max(num_new_blocks, 0)))
        self._cache_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        return True

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Point `child`'s first `num_blocks` entries at `parent`'s blocks (shared prompt, no copy)."""
        assert not child.block_table, "fork into an empty block table only"
        for block_id in parent.block_table[:num_blocks]:
            self._touch(block_id)
        child.block_table = parent.block_table[:num_blocks]
        child.num_computed_tokens = num_blocks * self.block_size
        child.num_cached_tokens = child.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Drop every reference `seq` holds; tail blocks are queued first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_evicted_tokens = 0

    def share(self, seq: Sequence, index: int, source_index: int) -> int:
        """Point `seq.block_table[index]` at the physical block of the earlier entry `source_index`.

        The entry must be a full block whose KV is computed, so nothing will ever be written through it.
        The duplicate loses this reference (and returns to the free queue if it was the last); no KV moves.
        Returns the physical block now shared.
        """
        table = seq.block_table
        if not 0 <= source_index < index < len(table):
            raise ValueError(f"share needs 0 <= source_index < index < {len(table)}, got {source_index}, {index}")
        self._check_full(seq, index)
        if table[index] == table[source_index]:
            raise ValueError(f"entries {source_index} and {index} already hold the same block")
        duplicate, target = table[index], table[source_index]
        self._touch(target)
        table[index] = target
        self._release(duplicate)
        return target

    def evict(self, seq: Sequence, indices: Seq[int]) -> None:
        """Drop the entries `indices` (full, computed blocks) from `seq`'s block table and release their blocks.

        Attention then skips their tokens; later tokens keep their positions (`seq.num_evicted_tokens`).
        """
        indices = sorted(set(indices))
        for index in indices:
            if not 0 <= index < len(seq.block_table):
                raise ValueError(f"evict: index {index} is outside the block table of {len(seq.block_table)}")
            self._check_full(seq, index)
        for index in reversed(indices):
            self._release(seq.block_table.pop(index))
        seq.num_evicted_tokens += len(indices) * self.block_size

    def _check_full(self, seq: Sequence, index: int) -> None:
        # Nothing is ever written through a full, computed entry, so it can be replaced or dropped safely.
        if (index + 1) * self.block_size > seq.num_cached_kv_tokens:
            raise ValueError(f"block {index} of sequence {seq.seq_id} is not full and computed")

    def read_kv(self, block_ids: Seq[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of physical blocks, copied and dequantized: each [num_layers, len(block_ids), block_size,
        kv_heads, head_dim]."""
        if self.kv_cache is None:
            raise RuntimeError("this block manager has no KV cache attached")
        return self.kv_cache.read(list(block_ids))

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free_queue[block_id]
        block.ref_cnt += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_cnt > 0, f"double free of block {block_id}"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block_id] = None
            if self.kv_cache is not None:
                self.kv_cache.release(block_id)

    def _pop_free(self) -> int:
        block_id = next(iter(self.free_queue))
        del self.free_queue[block_id]
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = block.hash_key = None
        block.ref_cnt = 1
        return block_id

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        # Only prompt blocks are cached: their content is fixed once the forward pass of this step ran.
        if not self.enable_prefix_caching or seq.num_computed_tokens >= seq.num_prompt_tokens:
            return
        num_full = min(num_tokens, seq.num_prompt_tokens) // self.block_size
        parent_hash = None
        for index in range(num_full):
            block = self.blocks[seq.block_table[index]]
            if block.block_hash is None:
                block.hash_key = self._hash_key(seq, index, parent_hash)
                block.block_hash = hash(block.hash_key)
                self.hash_to_block.setdefault(block.block_hash, block.block_id)
            parent_hash = block.block_hash
