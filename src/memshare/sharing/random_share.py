"""Random sharing, the control for MemShare: full generated blocks share a random earlier block of their table.

The share rate is held at `share_ratio` of the generated blocks by error diffusion: every new full block adds
the ratio to a running debt and is shared with probability equal to the debt, so which blocks are shared is
random while the affected ratio over a run matches the requested one to within a block or two.
"""

import random
from dataclasses import dataclass

from memshare.config import register_policy
from memshare.engine.policy import BlockOps, ModelAccess, PolicyRequest, SharingPolicy
from memshare.sharing.configs import RandomShareConfig


@dataclass(slots=True)
class RandomState:
    next_block: int
    preemptions: int
    considered: int = 0
    shared: int = 0


class RandomSharePolicy(SharingPolicy):
    def __init__(self, config: RandomShareConfig, block_manager: BlockOps, model: ModelAccess) -> None:
        super().__init__(config, block_manager, model)
        self.ratio = config.share_ratio
        self.rng = random.Random(config.seed)
        self.states: dict[int, RandomState] = {}
        self.debt = 0.0
        self.blocks_shared = 0

    def after_step(self, running: list[PolicyRequest]) -> None:
        for seq in running:
            state = self.states.get(seq.seq_id)
            if state is None:
                state = self.states[seq.seq_id] = RandomState(self.first_generated_block(seq), seq.num_preemptions)
            if state.preemptions != seq.num_preemptions:
                self._rewind(seq, state)
            for index in range(state.next_block, seq.num_cached_kv_tokens // self.block_manager.block_size):
                self._consider(seq, state, index)
            state.next_block = max(state.next_block, seq.num_cached_kv_tokens // self.block_manager.block_size)

    def _consider(self, seq: PolicyRequest, state: RandomState, index: int) -> None:
        state.considered += 1
        self.debt += self.ratio
        table = seq.block_table
        sources = [i for i in range(index) if table[i] != table[index]]
        if sources and self.rng.random() < self.debt:
            self.block_manager.share(seq, index, self.rng.choice(sources))
            self.debt -= 1
            state.shared += 1
            self.blocks_shared += 1

    def _rewind(self, seq: PolicyRequest, state: RandomState) -> None:
        # Preemption freed every block, shares included: take back this sequence's part of the debt.
        self.debt -= self.ratio * state.considered - state.shared
        self.states[seq.seq_id] = RandomState(self.first_generated_block(seq), seq.num_preemptions)

    def finish(self, seq: PolicyRequest) -> None:
        super().finish(seq)
        state = self.states.pop(seq.seq_id, None)
        # Blocks never considered (the one being written) still count in the affected ratio's denominator.
        self.debt += self.ratio * (seq.num_generated_blocks - (state.considered if state else 0))

    def stats(self) -> dict[str, float | int]:
        return super().stats() | {"blocks_shared": self.blocks_shared}


# Matched to a MemShare run: share at its affected ratio.
register_policy(RandomShareConfig, RandomSharePolicy, knobs=("share_ratio",),
                match={"share_ratio": lambda ratio: ratio})
