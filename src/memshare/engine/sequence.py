import enum
import time
from dataclasses import dataclass, field

import torch

from memshare.outputs import Logprob
from memshare.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample of one request: its tokens, how many have KV in the cache, and its block table."""

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    fork_parent: "Sequence | None" = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    # Tokens whose KV blocks an eviction policy dropped: token p lives in block_table[(p - evicted) // block_size].
    num_evicted_tokens: int = 0
    # Filled by the sharing policy when the sequence finishes: its generated blocks and how many were shared/evicted.
    num_generated_blocks: int = 0
    num_affected_blocks: int = 0
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_cached_kv_tokens(self) -> int:
        """Computed tokens whose KV is still in the block table."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
