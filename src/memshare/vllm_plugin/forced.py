"""Teacher forcing inside vLLM: logits processors that make every request whose
`SamplingParams.extra_args["forced_token_ids"]` is set produce exactly those tokens, so runs compare like for like.
`ForcedTokens` is for vLLM's V1 model runner, `ForcedTokensV2` for the V2 runner (its own processor interface);
`forced_tokens_processor(vllm_config)` picks the one an engine config needs."""

from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as LogitsProcessorV2


def forced_ids(params: SamplingParams) -> list[int] | None:
    return (params.extra_args or {}).get("forced_token_ids")


def validate_forced(params: SamplingParams) -> None:
    forced = forced_ids(params)
    if forced is not None and not (isinstance(forced, list) and forced and all(isinstance(t, int) for t in forced)):
        raise ValueError("extra_args['forced_token_ids'] must be a non-empty list of token ids")


def keep_only(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """Every logit of `rows` but its token's set to -inf, so any sampling picks that token."""
    kept = logits[rows, tokens]
    logits[rows] = float("-inf")
    logits[rows, tokens] = kept
    return logits


class ForcedTokens(LogitsProcessor):
    """Teacher forcing in vLLM's sampler: for a request whose `extra_args` carry `forced_token_ids`, every logit but
    the next forced token's is masked, so any sampling yields that token; other requests are left untouched.

    The next forced position is the number of output tokens so far. vLLM hands each added row a reference to the
    request's running output list, and hands the same list again when the request is re-added (resumed after a
    preemption, or after MemShare replaces its block-table row), so the position stays right across both."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (forced tokens, output tokens so far)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_forced(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax, so vLLM applies it under greedy sampling too

    @staticmethod
    def _row(params: SamplingParams, _: list[int] | None, output: list[int]) -> tuple[list[int], list[int]] | None:
        forced = forced_ids(params)
        return (forced, output) if forced else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # vLLM's own bookkeeping for sparse per-row state: removed, then added, then moved or swapped rows.
        process_dict_updates(self.rows, batch_update, self._row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            logits = keep_only(logits, list(self.rows), [forced[len(output)] for forced, output in self.rows.values()])
        return logits


class ForcedTokensV2(LogitsProcessorV2):
    """`ForcedTokens` for the V2 model runner: the next forced position is the sampled token's position in the
    sequence minus the prompt length, which holds across preemption and MemShare's row replacement alike."""

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        self.prompt_len = req_states.prompt_len
        self.forced: dict[int, list[int]] = {}  # request slot -> forced tokens

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_forced(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        forced = forced_ids(sampling_params)
        if forced:
            self.forced[req_idx] = forced
        else:
            self.forced.pop(req_idx, None)
        return bool(forced)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slots = ctx.expanded_idx_mapping.tolist()
        rows = [row for row, slot in enumerate(slots) if slot in self.forced]
        if rows:
            positions = ctx.pos.tolist()
            tokens = [self.forced[slots[r]][positions[r] + 1 - int(self.prompt_len.np[slots[r]])] for r in rows]
            logits = keep_only(logits, rows, tokens)
        return logits


def forced_tokens_processor(vllm_config: Any) -> type:
    """The forcing processor class for an engine config's model runner."""
    return ForcedTokensV2 if vllm_config.use_v2_model_runner else ForcedTokens
