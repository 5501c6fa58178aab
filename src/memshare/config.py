import math
import re
from dataclasses import dataclass, field

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string such as '512MiB', '1GiB', '2GB'."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory: cannot parse {value!r}; use bytes or e.g. '512MiB', '1GiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


POLICIES = ("none", "memshare")
STAGE1_ENCODERS = ("bow", "lsh")
REFLECTION_CUES = ("Wait", "Alternatively", "Hmm", "But", "Let me", "Let's", "Actually", "Double-check", "Verify",
                   "Check")


@dataclass(slots=True)
class ShareConfig:
    """MemShare: share KV blocks between similar reasoning steps of one request.

    policy: "none" (dense) or "memshare". A finished step is compared by bag-of-words cosine over token ids
    with every earlier step (stage 1, `stage1="lsh"` buckets by random-hyperplane LSH first); candidates at or
    above `step_threshold` have their blocks compared with the step's blocks by normalized Euclidean
    similarity of K and V (stage 2); a block whose best match reaches `block_threshold` is shared.
    Thresholds above 1 never share. `memshare calibrate` proposes a block threshold for a model.
    """

    policy: str = "none"
    step_threshold: float = 0.9
    block_threshold: float = 0.8
    stage1: str = "bow"
    min_step_tokens: int = 16
    split_on_blank_line: bool = True
    reflection_cues: tuple[str, ...] = REFLECTION_CUES
    # Stage 2 reads the KV of at most this many best stage-1 candidates per step, bounding its cost on long chains.
    max_candidate_steps: int = 8
    # 16 bands of 8 bits: a pair at cosine 0.9 collides in some band with p > 0.99, unrelated steps with p ~ 0.06.
    lsh_bands: int = 16
    lsh_rows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"share policy must be one of {POLICIES}, got {self.policy!r}")
        if self.stage1 not in STAGE1_ENCODERS:
            raise ValueError(f"stage1 must be one of {STAGE1_ENCODERS}, got {self.stage1!r}")
        for name in ("step_threshold", "block_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (above 1 never shares), got {value!r}")
        for name in ("min_step_tokens", "max_candidate_steps", "lsh_bands", "lsh_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.reflection_cues = tuple(self.reflection_cues)


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs, flowing down from `LLM(...)` to scheduler, block manager and runner."""

    model: str = "smollm2-135m"
    kv_cache_memory: int | str = "1GiB"
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    device: str = "auto"
    dtype: str = "auto"
    num_threads: int | None = None
    log_stats_interval: float = 10.0
    share: ShareConfig = field(default_factory=ShareConfig)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not isinstance(self.share, ShareConfig):
            raise TypeError(f"share must be a ShareConfig, got {type(self.share).__name__}")
        if parse_memory(self.kv_cache_memory) <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")
