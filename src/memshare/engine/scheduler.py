from collections import deque

from memshare.config import EngineConfig
from memshare.engine.block_manager import BlockManager
from memshare.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Continuous batching: running sequences first (decodes, then prefill chunks), then new admissions.

    When the block pool runs dry the most recently admitted sequence is preempted: its blocks are freed
    and it goes back to the front of the waiting queue, to be recomputed from its tokens later.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # computed tokens whose KV preemption dropped (prefix-cache hits may spare some)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of new tokens to compute) for this step, single-token decodes first."""
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}
        preempted = False
        for seq in list(self.running):
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                preempted = True
                if self.preempt(self.running[-1]) is seq:
                    break
            else:
                scheduled[seq] = num_new
                budget -= num_new
        while self.waiting and budget and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            computed = self._reuse_prompt_blocks(seq, scheduled)
            num_new = min(seq.num_tokens - seq.num_computed_tokens - len(computed) * self.block_manager.block_size,
                          budget)
            if not self.block_manager.allocate_slots(seq, num_new, computed):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq] = num_new
            budget -= num_new
        return sorted(scheduled.items(), key=lambda item: item[1] != 1)

    def _reuse_prompt_blocks(self, seq: Sequence, scheduled: dict[Sequence, int]) -> list[int]:
        """Fork the prompt blocks of a running sibling sample, else look the prompt up in the prefix cache."""
        parent = seq.fork_parent
        if parent is not None and parent.status is SequenceStatus.RUNNING:
            ready = parent.num_computed_tokens + scheduled.get(parent, 0)
            # Only the prompt is common: a sample recomputed after preemption has its own generated tokens.
            num_blocks = min(ready, seq.num_prompt_tokens, seq.num_tokens - 1) // self.block_manager.block_size
            if num_blocks:
                self.block_manager.fork(parent, seq, min(num_blocks, len(parent.block_table)))
                return []
        return self.block_manager.get_computed_blocks(seq)

    def preempt(self, seq: Sequence) -> Sequence:
        self.running.remove(seq)
        self.num_recomputed_tokens += seq.num_computed_tokens
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        return seq

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.finish(seq)
            elif seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                self.block_manager.free(seq)
                seq.status = SequenceStatus.FINISHED
