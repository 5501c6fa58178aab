import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from memshare.config import EngineConfig
from memshare.engine.block_manager import BlockManager
from memshare.engine.model_runner import ModelRunner
from memshare.engine.policy import ModelAccess, make_policy
from memshare.engine.scheduler import Scheduler
from memshare.engine.sequence import Sequence, SequenceStatus
from memshare.engine.stats import DENSE_FORMATS, MEMORY_KEYS, kv_bytes_saved, memory_saved
from memshare.errors import KVCacheTooSmallError, PromptTooLongError
from memshare.layers.kv_cache import FORMATS, block_bytes
from memshare.outputs import CompletionOutput, RequestOutput
from memshare.sampling_params import SamplingParams

logger = logging.getLogger("memshare")


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]


@dataclass(slots=True)
class History:
    """Evenly strided samples of a whole run in bounded memory: when full, every other one goes and the stride
    doubles, so a server that runs for days keeps `max_points` samples, not one per step."""

    max_points: int = 1024
    stride: int = 1
    num_seen: int = 0
    points: list[tuple] = field(default_factory=list)

    def append(self, point: tuple) -> None:
        if self.num_seen % self.stride == 0:
            self.points.append(point)
            if len(self.points) >= self.max_points:
                del self.points[1::2]
                self.stride *= 2
        self.num_seen += 1


@dataclass(slots=True)
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    engine_time_s: float = 0.0
    engine_cpu_time_s: float = 0.0  # this process's CPU time during steps: far below wall x threads means a busy CPU
    thread_steps: int = 0  # sum over steps of the CPU threads in force
    peak_used_blocks: int = 0
    finished_requests: int = 0
    sharing_time_s: float = 0.0
    # Physical blocks in use vs. blocks the same tables would hold without sharing, sampled once scheduled.
    peak_logical_blocks: int = 0
    sum_used_blocks: int = 0
    sum_logical_blocks: int = 0
    sum_tail_blocks: int = 0  # partial blocks held in a quantized cache's tail (layers/kv_cache.py)
    peak_running: int = 0
    sum_running: int = 0
    # (engine time, physical, logical, running sequences), sampled from every scheduled step
    kv_history: History = field(default_factory=History)


class LLMEngine:
    """The step loop: schedule, run the model, append sampled tokens, finish and free sequences."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_runner = ModelRunner(config)
        self.tokenizer = self.model_runner.tokenizer
        self.block_manager = BlockManager(self.model_runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching, self.model_runner.kv_cache)
        decode = None if self.tokenizer is None else self.tokenizer.decode  # policies that need text refuse None
        self.policy = make_policy(config.share, self.block_manager,
                                  ModelAccess(decode, self.model_runner.unrotate_keys, self.model_runner.embed_tokens))
        self.model_runner.capture_queries = self.policy.needs_queries
        self.scheduler = Scheduler(config, self.block_manager)
        self.max_model_len = self._max_model_len()
        self._requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._seq_ids = itertools.count()
        self._last_log = time.perf_counter()

    def _max_model_len(self) -> int:
        capacity = self.model_runner.num_kv_blocks * self.config.block_size
        model_len = self.model_runner.max_position_embeddings
        requested = self.config.max_model_len
        if requested is not None and requested > capacity:
            raise KVCacheTooSmallError(
                f"max_model_len={requested} needs {-(-requested // self.config.block_size)} KV blocks but the KV "
                f"cache holds {self.model_runner.num_kv_blocks} (kv_cache_memory={self.config.kv_cache_memory!r}); "
                "raise kv_cache_memory or lower max_model_len")
        if requested is not None and requested > model_len:
            raise PromptTooLongError(f"max_model_len={requested} exceeds the model's context of {model_len}")
        if requested is None and capacity < model_len:
            logger.info("max_model_len capped at %d tokens: the whole KV cache (model context %d)",
                        capacity, model_len)
        return requested or min(model_len, capacity)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise a typed error, changing nothing, if this request can never run."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        num = len(prompt_token_ids)
        if num == 0:
            raise ValueError("prompt is empty")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings are matched on decoded text; skip_tokenizer_init=True loads no tokenizer: "
                             "use stop_token_ids")
        context = min(self.model_runner.max_position_embeddings, self.config.max_model_len or 1 << 62)
        if num >= context:
            raise PromptTooLongError(
                f"prompt has {num} tokens; the context (max_model_len) is {context} and at least one token "
                "must be generated")
        if num >= self.max_model_len:
            raise KVCacheTooSmallError(
                f"prompt has {num} tokens but the KV cache holds only {self.max_model_len} tokens "
                f"({self.model_runner.num_kv_blocks} blocks of {self.config.block_size}); raise kv_cache_memory")
        vocab = self.model_runner.model.config.get_text_config().vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop token ids must be in [0, {vocab})")
        forced = params.forced_token_ids
        if forced is not None and any(t >= vocab for t in forced):
            raise ValueError(f"forced token ids must be in [0, {vocab})")
        if forced is not None and num + len(forced) > min(context, self.max_model_len):
            raise PromptTooLongError(
                f"prompt ({num} tokens) and forced tokens ({len(forced)}) exceed max_model_len "
                f"{min(context, self.max_model_len)}")

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("skip_tokenizer_init=True loads no tokenizer to encode a text prompt; give token ids "
                             "([1, 2, 3] or {'prompt_token_ids': [...]})")
        return self.tokenizer.encode(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request (a prompt string or token ids); raises before queueing anything if it is invalid."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        token_ids = prompt_token_ids or (self.encode(prompt) if isinstance(prompt, str) else list(prompt))
        self.validate(token_ids, params)
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(token_ids),
                         len(params.forced_token_ids or ()) or self.max_model_len)
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, list(token_ids), len(token_ids), params,
                           max_tokens, fork_parent=seqs[0] if seqs else None)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.model_runner.device).manual_seed(params.seed + index)
            seq.logprobs = [] if params.logprobs is not None else None
            seqs.append(seq)
        self.stats.prompt_tokens += len(token_ids)
        self._requests[request_id] = Request(request_id, prompt if isinstance(prompt, str) else None,
                                             list(token_ids), seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def sequences(self, request_id: str) -> list[Sequence]:
        """The sequences (one per sample) of an unfinished request; raises KeyError for an unknown or finished one."""
        return self._requests[request_id].seqs

    def snapshot(self, request_id: str) -> RequestOutput:
        """The output so far of an unfinished request (what streaming sends)."""
        return self._make_output(self._requests[request_id])

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                if not seq.is_finished:
                    self.policy.finish(seq)
            self.scheduler.abort(request.seqs)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the requests that finished in it."""
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._record_memory()
        sampled, tokens, logprobs = self.model_runner.run(batch)
        for seq, num_new in batch:
            seq.num_computed_tokens += num_new
        if self.model_runner.decode_queries is not None:
            with self._sharing_timer():
                for (seq, _), query in zip(batch, self.model_runner.decode_queries):
                    self.policy.observe(seq, query)
        finished: list[RequestOutput] = []
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            self._append_token(seq, token, logprob)
            if seq.is_finished:
                self.policy.finish(seq)
                self.scheduler.finish(seq)
                output = self._maybe_finish_request(seq.request_id)
                if output is not None:
                    finished.append(output)
        with self._sharing_timer():
            self.policy.after_step(self.scheduler.running)
        self.stats.generation_tokens += len(sampled)
        self.stats.num_steps += 1
        self.stats.engine_time_s += time.perf_counter() - start
        self.stats.engine_cpu_time_s += time.process_time() - cpu_start
        self.stats.thread_steps += torch.get_num_threads()
        self._maybe_log()
        return finished

    @contextmanager
    def _sharing_timer(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stats.sharing_time_s += time.perf_counter() - start

    def _record_memory(self) -> None:
        stats = self.stats
        used = self.block_manager.num_used_blocks
        logical = used + self.policy.saved_blocks(self.scheduler.running)
        running = len(self.scheduler.running)
        stats.peak_used_blocks = max(stats.peak_used_blocks, used)
        stats.peak_logical_blocks = max(stats.peak_logical_blocks, logical)
        stats.peak_running = max(stats.peak_running, running)
        stats.sum_used_blocks += used
        stats.sum_logical_blocks += logical
        stats.sum_tail_blocks += self.model_runner.kv_cache.num_tail_blocks_used
        stats.sum_running += running
        stats.kv_history.append((stats.engine_time_s, used, logical, running))

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token].logprob
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                self._finish(seq, "stop", token)
            elif token in self.model_runner.eos_token_ids and not params.ignore_eos:
                self._finish(seq, "stop", None)
            elif params.stop_strings and self._check_stop_strings(seq):
                return
        if not seq.is_finished and (seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            self._finish(seq, "length", None)

    def _check_stop_strings(self, seq: Sequence) -> bool:
        params = seq.params
        window = max(len(s) for s in params.stop_strings) + 8
        tail = self.tokenizer.decode(seq.output_token_ids[-window:], skip_special_tokens=params.skip_special_tokens)
        hit = next((s for s in params.stop_strings if s in tail), None)
        if hit is None:
            return False
        text = self._decode(seq)
        # The first occurrence in the full text: the tail check only says that one exists.
        cut = min(text.find(s) + (len(s) if params.include_stop_str_in_output else 0)
                  for s in params.stop_strings if s in text)
        self._finish(seq, "stop", hit, text[:cut])
        return True

    def _decode(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""  # skip_tokenizer_init: outputs carry token ids only
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, text: str | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.text = self._decode(seq) if text is None else text
        seq.status = SequenceStatus.FINISHED

    def _maybe_finish_request(self, request_id: str) -> RequestOutput | None:
        request = self._requests[request_id]
        if not all(s.is_finished for s in request.seqs):
            return None
        del self._requests[request_id]
        self.stats.finished_requests += 1
        return self._make_output(request)

    def _make_output(self, request: Request) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.text, s.output_token_ids, s.cumulative_logprob if s.logprobs is not None
                                    else None, s.logprobs, s.finish_reason, s.stop_reason) for s in request.seqs]
        first = request.seqs[0]
        ttft = (first.first_token_time - first.arrival_time) if first.first_token_time else 0.0
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             all(s.is_finished for s in request.seqs), first.num_cached_tokens,
                             {"time_to_first_token_s": ttft,
                              "latency_s": time.perf_counter() - first.arrival_time,
                              "kv_blocks_generated": sum(s.num_generated_blocks for s in request.seqs),
                              "kv_blocks_affected": sum(s.num_affected_blocks for s in request.seqs),
                              "num_preemptions": sum(s.num_preemptions for s in request.seqs)})

    def kv_history(self) -> list[tuple[float, int, int, int]]:
        """(engine seconds, physical KV blocks, blocks without sharing, running sequences), at most
        `History.max_points` samples evenly strided over every scheduled step so far."""
        return list(self.stats.kv_history.points)

    def get_stats(self) -> dict[str, float | int]:
        bm = self.block_manager
        elapsed = self.stats.engine_time_s
        return {
            "num_kv_blocks": bm.num_blocks,
            "block_size": bm.block_size,
            "kv_cache_bytes": bm.num_blocks * self.model_runner.block_bytes,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_peak": self.stats.peak_used_blocks,
            "kv_blocks_mean": self.stats.sum_used_blocks / self.stats.num_steps if self.stats.num_steps else 0.0,
            "kv_usage": bm.num_used_blocks / bm.num_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_recomputed_tokens": self.scheduler.num_recomputed_tokens,
            "num_running_peak": self.stats.peak_running,
            "num_running_mean": self.stats.sum_running / self.stats.num_steps if self.stats.num_steps else 0.0,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            "prompt_tokens": self.stats.prompt_tokens,
            "generation_tokens": self.stats.generation_tokens,
            "finished_requests": self.stats.finished_requests,
            "num_steps": self.stats.num_steps,
            "engine_time_s": elapsed,
            "engine_cpu_time_s": self.stats.engine_cpu_time_s,
            "num_threads_mean": self.stats.thread_steps / self.stats.num_steps if self.stats.num_steps else 0.0,
            "generation_tokens_per_s": self.stats.generation_tokens / elapsed if elapsed else 0.0,
            **self._sharing_stats(),
        }

    def _sharing_stats(self) -> dict[str, float | int]:
        s = self.stats
        return {
            "share_policy": self.config.share.policy,
            **self.policy.stats(),
            **memory_saved([{key: getattr(s, key) for key in MEMORY_KEYS}]),
            **self._bytes_stats(),
            "sharing_time_s": s.sharing_time_s,
            "sharing_time_share": s.sharing_time_s / s.engine_time_s if s.engine_time_s else 0.0,
        }

    def _bytes_stats(self) -> dict[str, float | int | str]:
        """KV bytes in use over the steps (blocks in the cache's format plus the tail blocks being filled) against
        the dense KV of the same tokens stored in float32 and in bfloat16."""
        s, runner = self.stats, self.model_runner
        counters = {"kv_block_bytes": runner.block_bytes, "kv_tail_block_bytes": runner.kv_cache.tail_block_bytes,
                    "sum_tail_blocks": s.sum_tail_blocks,
                    **{f"kv_block_bytes_{name}": block_bytes(FORMATS[name], runner.num_layers, runner.block_size,
                                                             runner.num_kv_heads, runner.head_dim)
                       for name in DENSE_FORMATS}}
        return {"kv_cache_dtype": runner.kv_format.name, **counters,
                **kv_bytes_saved([{**counters, "sum_used_blocks": s.sum_used_blocks,
                                   "sum_logical_blocks": s.sum_logical_blocks}])}

    def _maybe_log(self) -> None:
        interval = self.config.log_stats_interval
        now = time.perf_counter()
        if interval <= 0 or now - self._last_log < interval:
            return
        self._last_log = now
        s = self.get_stats()
        sharing = ""
        if s["share_policy"] != "none":
            sharing = (f" | shared {s['blocks_shared']} blocks, memory saved {100 * s['memory_saved_mean']:.1f}% "
                       f"(peak {100 * s['memory_saved_peak']:.1f}%)")
        logger.info("KV usage %.1f%% (%d/%d blocks, peak %d) | running %d, waiting %d | prefix hit rate %.1f%% | "
                    "preemptions %d | generation %.1f tok/s%s", 100 * s["kv_usage"], s["kv_blocks_used"],
                    s["num_kv_blocks"], s["kv_blocks_peak"], s["num_running"], s["num_waiting"],
                    100 * s["prefix_cache_hit_rate"], s["num_preemptions"], s["generation_tokens_per_s"], sharing)
