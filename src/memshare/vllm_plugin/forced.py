"""Teacher forcing inside vLLM: a v1 logits processor that makes every request whose
`SamplingParams.extra_args["forced_token_ids"]` is set produce exactly those tokens, so runs compare like for like."""

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates


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
        forced = (sampling_params.extra_args or {}).get("forced_token_ids")
        if forced is not None and not (isinstance(forced, list) and forced and all(isinstance(t, int) for t in forced)):
            raise ValueError("extra_args['forced_token_ids'] must be a non-empty list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax, so vLLM applies it under greedy sampling too

    @staticmethod
    def _row(params: SamplingParams, _: list[int] | None, output: list[int]) -> tuple[list[int], list[int]] | None:
        forced = (params.extra_args or {}).get("forced_token_ids")
        return (forced, output) if forced else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # vLLM's own bookkeeping for sparse per-row state: removed, then added, then moved or swapped rows.
        process_dict_updates(self.rows, batch_update, self._row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            rows = list(self.rows)
            tokens = [forced[len(output)] for forced, output in self.rows.values()]
            kept = logits[rows, tokens]
            logits[rows] = float("-inf")
            logits[rows, tokens] = kept
        return logits
