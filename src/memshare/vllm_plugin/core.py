"""MemShare attached to a vLLM EngineCore: the same `MemSharePolicy` as memshare's own engine, run after every
step on vLLM's requests, with stage 2 on the workers and shares applied to vLLM's block pool."""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from memshare.config import ShareConfig
from memshare.engine.policy import ModelAccess
from memshare.engine.stats import saved_fraction
from memshare.sharing.memshare import MemSharePolicy
from memshare.sharing.stage2 import combine, similarity
from memshare.vllm_plugin import _vllm_api as api
from memshare.vllm_plugin.metrics import MemShareMetrics

logger = logging.getLogger("memshare.vllm")


@dataclass(slots=True)
class RequestView:
    """A vLLM request as a policy reads it: implements `engine.policy.PolicyRequest`, as memshare's `Sequence` does."""

    seq_id: str
    num_prompt_tokens: int
    token_ids: Any = ()
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)
    num_evicted_tokens: int = 0
    num_generated_blocks: int = 0
    num_affected_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_cached_kv_tokens(self) -> int:
        return self.num_computed_tokens - self.num_evicted_tokens


class VllmBlocks:
    """`engine.policy.BlockOps` on vLLM's scheduler and block pool: the block operations `MemSharePolicy` calls."""

    def __init__(self, scheduler: Any, on_share) -> None:
        self.scheduler = scheduler
        self.block_size = api.block_size(scheduler)
        self.on_share = on_share

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def share(self, seq: RequestView, index: int, source_index: int) -> int:
        table = seq.block_table
        if not 0 <= source_index < index < len(table) or table[index] == table[source_index]:
            raise ValueError(f"cannot share entry {index} of {seq.seq_id} with {source_index}")
        if (index + 1) * self.block_size > seq.num_computed_tokens:
            raise ValueError(f"entry {index} of {seq.seq_id} is not a full, computed block")
        api.remap(self.scheduler, seq.seq_id, index, source_index)
        table[index] = table[source_index]
        self.on_share(seq.seq_id)
        return table[index]


class VllmMemShare:
    """Per EngineCore: runs the policy after each step and keeps the workers' block tables equal to the
    scheduler's (a remapped request's row is replaced on every rank)."""

    def __init__(self, core: Any, config: ShareConfig, verify: bool = False, log_interval: float = 10.0) -> None:
        problems = api.unsupported_features(core) + api.worker_problems(core)
        if config.policy != "memshare":
            problems.append(f"policy {config.policy!r} (the vLLM plugin runs 'memshare')")
        elif config.stage1 not in ("bow", "lsh"):
            problems.append(f"stage1={config.stage1!r} (the vLLM plugin runs 'bow' or 'lsh')")
        if problems:
            raise ValueError("MemShare cannot run with this vLLM configuration: " + "; ".join(problems))
        self.core, self.config, self.verify, self.log_interval = core, config, verify, log_interval
        self.verified = {"rows_checked": 0, "row_mismatches": 0, "free_block_mismatches": 0}
        self.scheduler = api.scheduler(core)
        self.rpc = api.collective_rpc(core)
        self.v2_runner = api.uses_v2_runner(core)
        self.last_scheduled: set[str] = set()
        self.blocks = VllmBlocks(self.scheduler, self._shared)
        tokenizer = api.tokenizer(core)
        self.policy = MemSharePolicy(config, self.blocks, ModelAccess(tokenizer.decode, None, None), self._score)
        self.views: dict[str, RequestView] = {}
        self.pending_rows: set[str] = set()
        self.hash_caps: dict[str, int] = {}
        self.num_steps = self.sum_used = self.sum_logical = 0
        self.sharing_seconds = 0.0
        self.metrics = MemShareMetrics(*api.metric_labels(core))
        self._last_log = time.monotonic()
        api.cap_prefix_hashing(self.scheduler, self.hash_caps.get)
        api.wrap_scheduler(self.scheduler, self._after_schedule, self._before_free)

    def after_step(self) -> None:
        if self.verify:
            self._verified_step()
        else:
            self._step()

    def _step(self) -> None:
        start = time.perf_counter()
        running = [self._view(req) for req in api.running_requests(self.scheduler) if api.request_is_running(req)]
        self.policy.after_step(running)
        used = api.num_used_blocks(self.scheduler)
        self.num_steps += 1
        self.sum_used += used
        self.sum_logical += used + self.policy.saved_blocks(running)
        self.sharing_seconds += time.perf_counter() - start
        stats = self.stats()
        self.metrics.update(stats)
        if self.log_interval and time.monotonic() - self._last_log >= self.log_interval:
            self._last_log = time.monotonic()
            logger.info("MemShare: %d blocks shared, memory saved %.1f%% (mean), affected ratio %.1f%%",
                        stats["blocks_shared"], 100 * stats["memory_saved_mean"], 100 * stats["affected_ratio"])

    def _verified_step(self) -> None:
        """`verify: true`: before the step's shares, every rank's rows must equal the scheduler's (all earlier shares
        reached the workers); after them, vLLM's free blocks must have risen by exactly the blocks shared."""
        self.verified["row_mismatches"] += len(self.check_worker_rows())
        self.verified["rows_checked"] += len(self.last_scheduled)
        free, shared = api.num_free_blocks(self.scheduler), self.policy.blocks_shared
        self._step()
        freed = api.num_free_blocks(self.scheduler) - free
        self.verified["free_block_mismatches"] += freed != self.policy.blocks_shared - shared

    def stats(self) -> dict[str, float | int]:
        return {**self.policy.stats(), "memory_saved_mean": saved_fraction(self.sum_used, self.sum_logical),
                "num_steps": self.num_steps,
                "sharing_seconds": self.sharing_seconds, **(self.verified if self.verify else {})}

    def check_worker_rows(self) -> list[str]:
        """Requests of the last step whose block ids on a worker differ from the scheduler's (empty: all agree).

        Call it before `after_step`: every earlier share must have reached the workers by then."""
        mismatches = []
        scheduled = self.last_scheduled
        for rows in self.rpc("memshare_block_rows"):
            for request_id, (state_ids, batch_row) in rows.items():
                req = api.request(self.scheduler, request_id)
                if request_id not in scheduled or req is None or not api.request_is_running(req):
                    continue
                expected = api.block_ids(self.scheduler, request_id)
                if state_ids != expected or batch_row not in (None, expected):
                    mismatches.append(request_id)
        return mismatches

    def _view(self, req: Any) -> RequestView:
        view = self.views.get(req.request_id)
        if view is None:
            view = self.views[req.request_id] = RequestView(req.request_id, req.num_prompt_tokens)
        view.token_ids = req.all_token_ids
        view.num_computed_tokens = api.computed_tokens(req)
        view.num_preemptions = req.num_preemptions
        view.block_table = api.block_ids(self.scheduler, req.request_id)
        return view

    def _score(self, block_ids, first_positions, m):
        """Each rank sums over its own KV heads and layers; the sums are combined here, then the similarity formed."""
        args = (list(block_ids), list(first_positions), m, self.config.stage2)
        parts = [part for part in self.rpc("memshare_partial_sums", args=args) if part is not None]
        return similarity(combine(parts), self.config.stage2)

    def _shared(self, request_id: str) -> None:
        self.pending_rows.add(request_id)
        # Blocks computed after a share attended to shared KV: they must never serve as prefix-cache hits.
        cap = api.num_cached_blocks(self.scheduler, request_id) * self.blocks.block_size
        self.hash_caps.setdefault(request_id, cap)

    def _after_schedule(self, output: Any) -> None:
        self.last_scheduled = api.scheduled_ids(output)
        if self.pending_rows:
            self.pending_rows -= api.replace_rows(output, self.scheduler, self.pending_rows, self.v2_runner)
            # A preempted request is resumed with its whole (new) block list anyway.
            self.pending_rows = {r for r in self.pending_rows
                                 if (req := api.request(self.scheduler, r)) is not None and api.request_is_running(req)}

    def _before_free(self, req: Any) -> None:
        view = self.views.pop(req.request_id, None)
        if view is not None:
            view.block_table = api.block_ids(self.scheduler, req.request_id)
            self.policy.finish(view)
        self.pending_rows.discard(req.request_id)
        self.hash_caps.pop(req.request_id, None)
