"""The contract between the engine and a KV policy, and the policy a config builds; the base policy is dense
attention (`policy="none"`). The policies themselves live in `memshare.sharing`, one module each, and register
their config.

The contract is written as Protocols: the request a policy reads (`PolicyRequest`: memshare's `Sequence`, the vLLM
plugin's `RequestView`), the block operations it may call (`BlockOps`: memshare's `BlockManager`, the plugin's
`VllmBlocks`; `KVBlockOps` adds eviction and KV reads, which only memshare's own engine offers) and the hooks the
engine calls (`KVPolicy`: every registered policy, through `SharingPolicy`).
"""

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from memshare.config import ShareConfig, register_policy, registration
from memshare.layers.rotary import UnrotateKeys


@runtime_checkable
class PolicyRequest(Protocol):
    """A request as a policy reads it, with the two counts `SharingPolicy.finish` records on it."""

    seq_id: Any
    token_ids: Seq[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    num_preemptions: int
    num_evicted_tokens: int
    block_table: list[int]
    num_generated_blocks: int
    num_affected_blocks: int

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def num_cached_kv_tokens(self) -> int: ...


@runtime_checkable
class BlockOps(Protocol):
    """The block operations every policy may call: sharing is block-table indirection, so any paged engine has it."""

    block_size: int

    def blocks_needed(self, num_tokens: int) -> int: ...

    def share(self, seq: PolicyRequest, index: int, source_index: int) -> int: ...


@runtime_checkable
class KVBlockOps(BlockOps, Protocol):
    """Block operations of memshare's own engine beyond sharing: evicting entries and reading blocks' K/V."""

    def evict(self, seq: PolicyRequest, indices: Seq[int]) -> None: ...

    def read_kv(self, block_ids: Seq[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class KVPolicy(Protocol):
    """The hooks the engine calls on a policy between steps."""

    needs_queries: bool

    def observe(self, seq: PolicyRequest, query: torch.Tensor) -> None: ...

    def after_step(self, running: list[PolicyRequest]) -> None: ...

    def finish(self, seq: PolicyRequest) -> None: ...

    def saved_blocks(self, running: list[PolicyRequest]) -> int: ...

    def stats(self) -> dict[str, float | int]: ...


@dataclass(slots=True)
class ModelAccess:
    """What a policy may ask of the model: text of token ids (None without a tokenizer: `skip_tokenizer_init`),
    cached keys with RoPE undone, input embeddings."""

    decode: Callable[[list[int]], str] | None
    unrotate_keys: UnrotateKeys
    embed_tokens: Callable[[list[int]], torch.Tensor]


def first_holders(block_table: list[int]) -> dict[int, int]:
    """Physical block -> the first entry of `block_table` pointing at it: where its KV was written."""
    holders: dict[int, int] = {}
    for index, block_id in enumerate(block_table):
        holders.setdefault(block_id, index)
    return holders


def duplicate_entries(seq: PolicyRequest, start: int = 0) -> int:
    """Entries from `start` on that point at a physical block an earlier entry of the same table holds."""
    holders = first_holders(seq.block_table)
    return sum(holders[block_id] != index for index, block_id in enumerate(seq.block_table) if index >= start)


class SharingPolicy:
    """Dense: never shares; implements `KVPolicy`. Subclasses edit block tables through `BlockOps` in `after_step`."""

    needs_queries = False  # True: the engine passes each decoded token's attention query to `observe`

    def __init__(self, config: ShareConfig, block_manager: BlockOps, model: ModelAccess) -> None:
        self.config = config
        self.block_manager = block_manager
        self.generated_blocks = 0
        self.affected_blocks = 0

    def observe(self, seq: PolicyRequest, query: torch.Tensor) -> None:
        """The query [layers, heads, head_dim] of `seq`'s latest decoded token, if `needs_queries`."""

    def after_step(self, running: list[PolicyRequest]) -> None:
        """Called after every engine step with the running sequences (their new tokens appended)."""

    def finish(self, seq: PolicyRequest) -> None:
        """Called before a finished or aborted sequence frees its blocks: records its affected blocks."""
        first_generated = self.first_generated_block(seq)
        evicted = seq.num_evicted_tokens // self.block_manager.block_size
        seq.num_generated_blocks = max(len(seq.block_table) + evicted - first_generated, 0)
        seq.num_affected_blocks = duplicate_entries(seq, first_generated) + evicted
        self.generated_blocks += seq.num_generated_blocks
        self.affected_blocks += seq.num_affected_blocks

    def first_generated_block(self, seq: PolicyRequest) -> int:
        return self.block_manager.blocks_needed(seq.num_prompt_tokens)

    def saved_blocks(self, running: list[PolicyRequest]) -> int:
        """Blocks the running sequences would hold more without sharing or eviction."""
        bs = self.block_manager.block_size
        return sum(duplicate_entries(seq) + seq.num_evicted_tokens // bs for seq in running)

    def stats(self) -> dict[str, float | int]:
        return {"blocks_shared": 0, "stage1_candidates": 0, "stage2_pairs": 0,
                "affected_ratio": self.affected_blocks / self.generated_blocks if self.generated_blocks else 0.0}


def make_policy(config: ShareConfig, block_manager: KVBlockOps, model: ModelAccess) -> SharingPolicy:
    """The sharing policy `config` registered, over this block manager and model."""
    return registration(config.policy).policy_class(config, block_manager, model)


register_policy(ShareConfig, SharingPolicy)
