from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from memshare.errors import SamplingParamsError, SamplingParamsTypeError

# vLLM's per-request logits processor: (output token ids so far, logits of the next token [vocab]) -> logits.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

# (field, accepted types, what the error says it takes); None passes where the type names it. bool is no number here.
# vLLM's _SAMPLING_EPS: a smaller temperature samples greedily (dividing by it would overflow float32).
GREEDY_BELOW = 1e-5
_FIELD_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("n", (Integral,), "an int"), ("temperature", (Real,), "a float"), ("top_p", (Real,), "a float"),
    ("top_k", (Integral,), "an int"), ("min_p", (Real,), "a float"), ("repetition_penalty", (Real,), "a float"),
    ("presence_penalty", (Real,), "a float"), ("frequency_penalty", (Real,), "a float"),
    ("seed", (Integral, type(None)), "an int or None"),
    ("stop", (str, list, tuple, type(None)), "a str, a list of str or None"),
    ("stop_token_ids", (list, tuple, type(None)), "a list of int or None"),
    ("include_stop_str_in_output", (bool,), "a bool"), ("max_tokens", (Integral, type(None)), "an int or None"),
    ("min_tokens", (Integral,), "an int"), ("ignore_eos", (bool,), "a bool"),
    ("logprobs", (Integral, type(None)), "an int or None"), ("skip_special_tokens", (bool,), "a bool"),
    ("logits_processors", (list, tuple), "a list of callables"),
    ("forced_token_ids", (list, tuple, type(None)), "a list of int or None"),
)


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request, with vLLM's names and defaults.

    `temperature=0` (below 1e-5, as in vLLM) is greedy. `top_k=0` (or -1), `top_p=1` and `min_p=0` disable those
    filters.
    `seed` makes a request's samples reproducible whatever else runs beside it.
    `logprobs=k` returns, per generated token, the sampled token's and the top-k log-probabilities.
    `logits_processors` see (and may change) each request's next-token logits before sampling.
    `forced_token_ids` teacher-forces the output: those tokens are produced in order instead of sampled tokens
    (logprobs are then the forced tokens'), and the request ends after the last one (or at `max_tokens`); stop
    conditions still apply, so set `ignore_eos` to force past an end-of-sequence token.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    forced_token_ids: list[int] | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for name, types, expected in _FIELD_TYPES:
            value = getattr(self, name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise SamplingParamsTypeError(
                    f"SamplingParams.{name} must be {expected}, got {type(value).__name__} {value!r}")
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 or -1 (disabled) or a positive integer"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("seed", self.seed is None or -(1 << 63) <= self.seed < 1 << 63, "must fit in 64 bits"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1 or None"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must be <= max_tokens"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0 or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop_strings), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            ("logits_processors", all(callable(f) for f in self.logits_processors), "must be callables"),
            ("forced_token_ids", self.forced_token_ids is None or (
                len(self.forced_token_ids) > 0 and all(isinstance(t, int) and t >= 0 for t in self.forced_token_ids)),
             "must be a non-empty list of non-negative integers or None"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingParamsError(f"SamplingParams.{name} {message}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
