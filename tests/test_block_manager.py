"""Property tests: ref counts always equal block-table references, nothing leaks, no double free."""

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memshare import SamplingParams
from memshare.engine.block_manager import BlockManager
from memshare.engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 24
PARAMS = SamplingParams()


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(tokens), len(tokens), PARAMS, 64)


def check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    refs = Counter(b for s in seqs for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_cnt == refs[block.block_id]
        assert (block.block_id in bm.free_queue) == (block.ref_cnt == 0)
    assert bm.num_free_blocks + len(refs) == bm.num_blocks
    for block_hash, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].block_hash == block_hash
    for seq in seqs:
        assert len(seq.block_table) == bm.blocks_needed(seq.num_cached_kv_tokens)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.running: list[Sequence] = []
        self.next_id = 0

    def _new(self, tokens: list[int]) -> Sequence:
        self.next_id += 1
        return make_seq(self.next_id, tokens)

    def _run(self, seq: Sequence, num_new: int) -> None:
        seq.num_computed_tokens += num_new  # what the engine does after the forward pass

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4, 5, 6, 7, 8]]),
          tail=st.lists(st.integers(0, 3), min_size=1, max_size=14))
    def allocate(self, prefix: list[int], tail: list[int]) -> None:
        seq = self._new(prefix + tail)
        computed = self.bm.get_computed_blocks(seq)
        num_new = seq.num_tokens - len(computed) * BLOCK_SIZE
        if self.bm.allocate_slots(seq, num_new, computed):
            self._run(seq, num_new)
            self.running.append(seq)
        else:
            assert not seq.block_table and seq.num_computed_tokens == 0

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 100), token=st.integers(0, 3))
    def append(self, index: int, token: int) -> None:
        seq = self.running[index % len(self.running)]
        seq.token_ids.append(token)
        if self.bm.allocate_slots(seq, 1):
            self._run(seq, 1)
        else:
            self.preempt(index)

    @precondition(lambda self: any(not s.num_evicted_tokens for s in self.running))
    @rule(index=st.integers(0, 100))
    def fork(self, index: int) -> None:
        parents = [s for s in self.running if not s.num_evicted_tokens]  # the engine forks prompts only
        parent = parents[index % len(parents)]
        child = self._new(parent.token_ids)
        num_blocks = (parent.num_computed_tokens - 1) // BLOCK_SIZE
        self.bm.fork(parent, child, num_blocks)
        num_new = child.num_tokens - child.num_computed_tokens
        if self.bm.allocate_slots(child, num_new):
            self._run(child, num_new)
            self.running.append(child)
        else:
            self.bm.free(child)
            assert not child.block_table

    @precondition(lambda self: any(s.num_cached_kv_tokens >= 2 * BLOCK_SIZE for s in self.running))
    @rule(index=st.integers(0, 100), entry=st.integers(0, 100), source=st.integers(0, 100))
    def share(self, index: int, entry: int, source: int) -> None:
        candidates = [s for s in self.running if s.num_cached_kv_tokens >= 2 * BLOCK_SIZE]
        seq = candidates[index % len(candidates)]
        num_full = seq.num_cached_kv_tokens // BLOCK_SIZE
        entry = 1 + entry % (num_full - 1)
        source = source % entry
        table = seq.block_table
        if table[entry] == table[source]:
            with pytest.raises(ValueError, match="already hold"):
                self.bm.share(seq, entry, source)
            return
        duplicate, target = table[entry], table[source]
        others = sum(b == duplicate for s in self.running for b in s.block_table) - 1
        assert self.bm.share(seq, entry, source) == target
        assert table[entry] == target
        assert (duplicate in self.bm.free_queue) == (others == 0)

    @precondition(lambda self: any(s.num_cached_kv_tokens >= BLOCK_SIZE for s in self.running))
    @rule(index=st.integers(0, 100), picks=st.lists(st.integers(0, 100), min_size=1, max_size=3))
    def evict(self, index: int, picks: list[int]) -> None:
        candidates = [s for s in self.running if s.num_cached_kv_tokens >= BLOCK_SIZE]
        seq = candidates[index % len(candidates)]
        num_full = seq.num_cached_kv_tokens // BLOCK_SIZE
        entries = sorted({p % num_full for p in picks})
        dropped = [seq.block_table[e] for e in entries]
        kept = [b for e, b in enumerate(seq.block_table) if e not in entries]
        evicted_before, computed_before = seq.num_evicted_tokens, seq.num_computed_tokens
        self.bm.evict(seq, entries)
        assert seq.block_table == kept  # the partial block being written is never among the full entries
        assert seq.num_evicted_tokens == evicted_before + len(entries) * BLOCK_SIZE
        assert seq.num_computed_tokens == computed_before
        for block_id in dropped:
            assert (block_id in self.bm.free_queue) == all(block_id not in s.block_table for s in self.running)
        with pytest.raises(ValueError, match="outside"):
            self.bm.evict(seq, [len(seq.block_table)])
        if seq.num_cached_kv_tokens % BLOCK_SIZE:
            with pytest.raises(ValueError, match="not full"):
                self.bm.evict(seq, [len(seq.block_table) - 1])

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 100))
    def free(self, index: int) -> None:
        self.bm.free(self.running.pop(index % len(self.running)))

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 100))
    def preempt(self, index: int) -> None:
        seq = self.running.pop(index % len(self.running))
        self.bm.free(seq)
        assert seq.num_computed_tokens == seq.num_evicted_tokens == 0 and not seq.block_table

    @invariant()
    def invariants(self) -> None:
        check_invariants(self.bm, self.running)

    def teardown(self) -> None:
        for seq in self.running:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(b.ref_cnt == 0 for b in self.bm.blocks)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


def test_double_free_is_caught():
    bm = BlockManager(4, BLOCK_SIZE)
    seq = make_seq(0, [1, 2, 3])
    assert bm.allocate_slots(seq, 3)
    block_id = seq.block_table[0]
    bm.free(seq)
    seq.block_table = [block_id]
    with pytest.raises(AssertionError, match="double free"):
        bm.free(seq)


def test_prefix_hit_reuses_block_and_freed_block_is_reused():
    bm = BlockManager(4, BLOCK_SIZE)
    first = make_seq(0, [1, 2, 3, 4, 5])
    assert bm.allocate_slots(first, 5)
    first.num_computed_tokens = 5
    shared = first.block_table[0]
    bm.free(first)
    second = make_seq(1, [1, 2, 3, 4, 9, 9])
    computed = bm.get_computed_blocks(second)
    assert computed == [shared]
    assert bm.allocate_slots(second, 2, computed)
    assert second.block_table[0] == shared and second.num_cached_tokens == BLOCK_SIZE
    third = make_seq(2, [7, 7, 7, 7, 7])
    assert bm.allocate_slots(third, 5)  # reuses the freed tail block of `first`
    assert first.block_table == [] and bm.num_free_blocks == 0
    assert not bm.allocate_slots(make_seq(3, [5] * 9), 9)


def test_hash_collision_does_not_share(monkeypatch):
    bm = BlockManager(4, BLOCK_SIZE)
    first = make_seq(0, [1, 2, 3, 4, 5])
    assert bm.allocate_slots(first, 5)
    block = bm.blocks[first.block_table[0]]
    # Force a collision: another prefix is looked up under the first block's hash.
    other = make_seq(1, [9, 9, 9, 9, 9])
    bm.hash_to_block[hash(bm._hash_key(other, 0, None))] = block.block_id
    assert bm.get_computed_blocks(other) == []


def test_share_frees_the_duplicate_for_reuse_and_checks_its_arguments():
    bm = BlockManager(4, BLOCK_SIZE)
    seq = make_seq(0, list(range(9)))
    assert bm.allocate_slots(seq, 9)
    seq.num_computed_tokens = 9
    first, duplicate, tail = seq.block_table
    with pytest.raises(ValueError, match="source_index < index"):
        bm.share(seq, 1, 1)
    with pytest.raises(ValueError, match="source_index < index"):
        bm.share(seq, 0, 1)
    with pytest.raises(ValueError, match="not full and computed"):
        bm.share(seq, 2, 0)  # the block being written
    assert bm.share(seq, 1, 0) == first
    assert seq.block_table == [first, first, tail]
    assert bm.blocks[first].ref_cnt == 2 and bm.blocks[duplicate].ref_cnt == 0
    other = make_seq(1, list(range(8)))
    assert bm.allocate_slots(other, 8)  # the two free blocks, the freed duplicate among them
    assert duplicate in other.block_table and bm.num_free_blocks == 0
    bm.free(seq)
    bm.free(other)
    assert bm.num_free_blocks == 4 and all(b.ref_cnt == 0 for b in bm.blocks)
