"""The config dataclasses of the sharing policies, each a `ShareConfig` with its fields, defaults, help and checks.

They live apart from the policies so that a policy's helpers (the step splitter, stage 1) take their config without
importing the policy that uses them. Each policy module imports its config from here and registers the pair with
`register_policy` beside its policy class; importing `memshare.sharing` registers them all.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

from memshare.config import ShareConfig, check_fraction, check_positive

# The choices of MemShareConfig.stage1 (sharing/stage1.py), .stage2 (sharing/stage2.py) and the default reflection
# cues of the step splitter (sharing/steps.py).
STAGE1_ENCODERS = ("bow", "lsh", "embedding", "minilm")
STAGE2_METRICS = ("euclidean", "cosine")
REFLECTION_CUES = ("Wait", "Alternatively", "Hmm", "But", "Let me", "Let's", "Actually", "Double-check", "Verify",
                   "Check")


@dataclass(slots=True)
class MemShareConfig(ShareConfig):
    """MemShare: a finished step is compared by bag-of-words cosine over token ids with every earlier step
    (stage 1; `stage1="lsh"` buckets by random-hyperplane LSH first); candidates at or above `step_threshold` have
    their blocks compared with the step's blocks by normalized Euclidean similarity of K and V (stage 2); a block
    whose best match reaches `block_threshold` is shared. Thresholds above 1 never share. `memshare calibrate`
    proposes a block threshold for a model. Ablations: `stage1="embedding"` (mean input embedding) or `"minilm"`
    (sentence embedding of the step text), `stage2="cosine"`."""

    policy: ClassVar[str] = "memshare"
    step_threshold: float = field(default=0.9, metadata={
        "help": "stage-1 cosine a step needs to be a candidate (above 1: never)"})
    block_threshold: float = field(default=0.8, metadata={
        "help": "stage-2 similarity a block pair needs to be shared (above 1: never)"})
    stage1: str = field(default="bow", metadata={
        "help": "bow: cosine against every earlier step; lsh: hyperplane-LSH buckets first",
        "choices": STAGE1_ENCODERS})
    stage2: str = field(default="euclidean", metadata={
        "help": "block similarity: normalized Euclidean (MemShare) or cosine (ablation)", "choices": STAGE2_METRICS})
    min_step_tokens: int = field(default=16, metadata={"help": "a shorter step continues into the next"})
    split_on_blank_line: bool = True
    reflection_cues: tuple[str, ...] = REFLECTION_CUES
    # Stage 2 reads the KV of at most this many best stage-1 candidates per step, bounding its cost on long chains.
    max_candidate_steps: int = 8
    # 16 bands of 8 bits: a pair at cosine 0.9 collides in some band with p > 0.99, unrelated steps with p ~ 0.06.
    lsh_bands: int = 16
    lsh_rows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage1 not in STAGE1_ENCODERS:
            raise ValueError(f"stage1 must be one of {STAGE1_ENCODERS}, got {self.stage1!r}")
        if self.stage2 not in STAGE2_METRICS:
            raise ValueError(f"stage2 must be one of {STAGE2_METRICS}, got {self.stage2!r}")
        for name in ("step_threshold", "block_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (above 1 never shares), got {value!r}")
        check_positive(self, "min_step_tokens", "max_candidate_steps", "lsh_bands", "lsh_rows")
        self.reflection_cues = tuple(self.reflection_cues)


@dataclass(slots=True)
class RandomShareConfig(ShareConfig):
    """Random sharing: each full generated block shares a random earlier block at rate `share_ratio`."""

    policy: ClassVar[str] = "random"
    share_ratio: float = field(default=0.1, metadata={"help": "fraction of generated blocks shared"})
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction(self, "share_ratio")


@dataclass(slots=True)
class StreamingLLMConfig(ShareConfig):
    """StreamingLLM: the prompt (its first tokens are the attention sinks) and the most recent generated blocks."""

    policy: ClassVar[str] = "streamingllm"
    kv_budget: float = field(default=32, metadata={
        "help": "generated blocks kept per request (below 1: that fraction)"})
    remap_threshold: float = field(default=2.0, metadata={
        "help": "share a given-up block with its most similar earlier kept block at this stage-2 similarity "
                "instead of evicting it (above 1: always evict)"})

    def __post_init__(self) -> None:
        if not isinstance(self.remap_threshold, (int, float)) or not self.remap_threshold >= 0:
            raise ValueError(f"remap_threshold must be a number >= 0 (above 1: never), got {self.remap_threshold!r}")
        budget = self.kv_budget
        if not isinstance(budget, (int, float)) or not budget > 0 or math.isinf(budget):
            raise ValueError(f"kv_budget must be a block count >= 1 or a fraction in (0, 1), got {budget!r}")
        if budget > 1 and budget != int(budget):
            raise ValueError(f"kv_budget above 1 is a number of blocks and must be whole, got {budget!r}")


@dataclass(slots=True)
class H2OConfig(StreamingLLMConfig):
    """H2O: heavy hitters by accumulated attention plus `recent_fraction` of the budget as recent window."""

    policy: ClassVar[str] = "h2o"
    recent_fraction: float = field(default=0.5, metadata={"help": "share of the budget kept as recent window"})

    def __post_init__(self) -> None:
        super(H2OConfig, self).__post_init__()
        check_fraction(self, "recent_fraction")


@dataclass(slots=True)
class RKVConfig(StreamingLLMConfig):
    """R-KV: attention importance minus key redundancy, weighted by `rkv_lambda`, every `compress_interval`
    tokens."""

    policy: ClassVar[str] = "rkv"
    compress_interval: int = field(default=128, metadata={"help": "compress every N generated tokens"})
    rkv_lambda: float = field(default=0.1, metadata={
        "help": "weight of attention importance against key redundancy"})

    def __post_init__(self) -> None:
        super(RKVConfig, self).__post_init__()
        check_fraction(self, "rkv_lambda")
        check_positive(self, "compress_interval")
