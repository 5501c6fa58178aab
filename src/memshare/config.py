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


EVICTION_POLICIES = ("streamingllm", "h2o", "rkv")
POLICIES = ("none", "memshare", "random", *EVICTION_POLICIES)
STAGE1_ENCODERS = ("bow", "lsh", "embedding", "minilm")
STAGE2_METRICS = ("euclidean", "cosine")
REFLECTION_CUES = ("Wait", "Alternatively", "Hmm", "But", "Let me", "Let's", "Actually", "Double-check", "Verify",
                   "Check")


@dataclass(slots=True)
class ShareConfig:
    """How the KV blocks of a request's generated region are shared or evicted (`policy`).

    "none" is dense attention. "memshare": a finished step is compared by bag-of-words cosine over token ids
    with every earlier step (stage 1, `stage1="lsh"` buckets by random-hyperplane LSH first); candidates at or
    above `step_threshold` have their blocks compared with the step's blocks by normalized Euclidean
    similarity of K and V (stage 2); a block whose best match reaches `block_threshold` is shared.
    Thresholds above 1 never share. `memshare calibrate` proposes a block threshold for a model. Ablations:
    `stage1="embedding"` (mean input embedding) or `"minilm"` (sentence embedding of the step text),
    `stage2="cosine"`.

    Baselines in the same block pool: "random" shares each full generated block with a random earlier one
    at rate `share_ratio`; "streamingllm" (recent window), "h2o" (heavy hitters by accumulated attention +
    `recent_fraction` of the budget as recent window) and "rkv" (attention importance minus key redundancy,
    weighted by `rkv_lambda`, every `compress_interval` tokens) evict generated blocks down to `kv_budget`
    blocks per request (a value below 1 keeps that fraction of the generated blocks). The prompt is
    never evicted, so its first tokens are the attention sinks.
    """

    policy: str = "none"
    step_threshold: float = 0.9
    block_threshold: float = 0.8
    stage1: str = "bow"
    stage2: str = "euclidean"
    min_step_tokens: int = 16
    split_on_blank_line: bool = True
    reflection_cues: tuple[str, ...] = REFLECTION_CUES
    # Stage 2 reads the KV of at most this many best stage-1 candidates per step, bounding its cost on long chains.
    max_candidate_steps: int = 8
    # 16 bands of 8 bits: a pair at cosine 0.9 collides in some band with p > 0.99, unrelated steps with p ~ 0.06.
    lsh_bands: int = 16
    lsh_rows: int = 8
    seed: int = 0
    share_ratio: float = 0.1
    kv_budget: float = 32
    recent_fraction: float = 0.5
    compress_interval: int = 128
    rkv_lambda: float = 0.1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"share policy must be one of {POLICIES}, got {self.policy!r}")
        if self.stage1 not in STAGE1_ENCODERS:
            raise ValueError(f"stage1 must be one of {STAGE1_ENCODERS}, got {self.stage1!r}")
        if self.stage2 not in STAGE2_METRICS:
            raise ValueError(f"stage2 must be one of {STAGE2_METRICS}, got {self.stage2!r}")
        for name in ("share_ratio", "recent_fraction", "rkv_lambda"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.kv_budget, (int, float)) or not self.kv_budget > 0 or math.isinf(self.kv_budget):
            raise ValueError(f"kv_budget must be a block count >= 1 or a fraction in (0, 1), got {self.kv_budget!r}")
        if self.kv_budget > 1 and self.kv_budget != int(self.kv_budget):
            raise ValueError(f"kv_budget above 1 is a number of blocks and must be whole, got {self.kv_budget!r}")
        for name in ("step_threshold", "block_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (above 1 never shares), got {value!r}")
        for name in ("min_step_tokens", "max_candidate_steps", "lsh_bands", "lsh_rows", "compress_interval"):
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


@dataclass(slots=True)
class ServerConfig:
    """HTTP settings and the bounds every request is checked against."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    max_n: int = 16
    shutdown_timeout: float = 30.0
