"""A policy added the way a user adds one: this module alone, with its config dataclass and a registration."""

from dataclasses import dataclass, field
from typing import ClassVar

from memshare.config import ShareConfig, register_policy
from memshare.engine.block_manager import BlockManager
from memshare.engine.policy import ModelAccess, SharingPolicy
from memshare.engine.sequence import Sequence


@dataclass(slots=True)
class EveryNthConfig(ShareConfig):
    policy: ClassVar[str] = "every_nth"
    every: int = field(default=3, metadata={"help": "share every Nth generated block with the first one"})


class EveryNthPolicy(SharingPolicy):
    """Points every `every`-th full generated block at the first generated block."""

    def __init__(self, config: EveryNthConfig, block_manager: BlockManager, model: ModelAccess) -> None:
        super().__init__(config, block_manager, model)
        self.blocks_shared = 0

    def after_step(self, running: list[Sequence]) -> None:
        for seq in running:
            first = self.first_generated_block(seq)
            for index in range(first + self.config.every, seq.num_cached_kv_tokens // self.block_manager.block_size,
                               self.config.every):
                if seq.block_table[index] != seq.block_table[first]:
                    self.block_manager.share(seq, index, first)
                    self.blocks_shared += 1

    def stats(self) -> dict[str, float | int]:
        return super().stats() | {"blocks_shared": self.blocks_shared}


register_policy(EveryNthConfig, EveryNthPolicy, knobs=("every",))
