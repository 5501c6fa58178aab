import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from memshare.errors import KVCacheDtypeError, QuantizationError

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


@dataclass(slots=True)
class ShareConfig:
    """How the KV blocks of a request's generated region are shared or evicted: this base is dense attention
    (policy "none"); every other policy subclasses it in its own module with its own fields and registers itself
    with `register_policy`. `share_config("memshare", block_threshold=0.6)` builds one by name."""

    policy: ClassVar[str] = "none"

    def to_dict(self) -> dict[str, Any]:
        """The policy name and every field, as saved with results."""
        return {"policy": self.policy, **asdict(self)}


@dataclass(frozen=True, slots=True)
class PolicyRegistration:
    config: type[ShareConfig]
    policy_class: type  # a SharingPolicy subclass, built as policy_class(config, block_manager, model_access)
    knobs: tuple[str, ...] = ()  # the fields that tell runs apart: in labels, always reported, set by --sweep
    # Fields that `field=memshare` sets from a MemShare run's affected ratio, and how.
    match: tuple[tuple[str, Callable[[float], float]], ...] = ()


_REGISTRY: dict[str, PolicyRegistration] = {}


def register_policy(config: type[ShareConfig], policy_class: type, knobs: tuple[str, ...] = (),
                    match: dict[str, Callable[[float], float]] | None = None) -> None:
    """Make `config.policy` a policy of the engine, of `--share`/`--policies` and of the reports, run by
    `policy_class(config, block_manager, model_access)` (a `SharingPolicy` subclass). `knobs`: the fields that
    tell its runs apart (labels, `--sweep`); `match`: fields `field=memshare` sets from a MemShare run's affected
    ratio, and how."""
    if not (isinstance(config, type) and issubclass(config, ShareConfig)) or not config.policy:
        raise TypeError(f"a policy's config must subclass ShareConfig and name its policy, got {config!r}")
    names = {f.name for f in fields(config)}
    unknown = (set(knobs) | set(match or {})) - names
    if unknown:
        raise ValueError(f"{config.policy}: knobs {sorted(unknown)} are not fields of {config.__name__}")
    _REGISTRY[config.policy] = PolicyRegistration(config, policy_class, tuple(knobs), tuple((match or {}).items()))


def policy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def registration(policy: str) -> PolicyRegistration:
    """The registration of `policy`; raises ValueError naming the registered ones."""
    if policy not in _REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; choose from {policy_names()}")
    return _REGISTRY[policy]


def share_config(policy: str = "none", **values: Any) -> ShareConfig:
    """The config of a registered policy from its name and field values; raises ValueError on a field it lacks."""
    config = registration(policy).config
    unknown = set(values) - {f.name for f in fields(config)}
    if unknown:
        raise ValueError(f"policy {policy!r} has no setting(s) {sorted(unknown)}; its settings: "
                         f"{[f.name for f in fields(config)]}")
    return config(**values)


def check_fraction(config: ShareConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_positive(config: ShareConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")


MODEL_IMPLS = ("auto", "transformers")
# "auto": on CPU the C++ decode kernel (layers/cpu_kernels.py), on CUDA the Triton kernels (layers/triton_attention.py).
ATTENTION_BACKENDS = ("auto", "triton", "torch")
LOAD_FORMATS = ("auto", "dummy")
# vLLM's model dtypes: "half" is float16, "float" float32.
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# Weights kept quantized: "gguf" a GGUF file's own Q8_0/Q4_0/Q4_1 codes; "int8", "int4" quantized at load
# (layers/linear.py). vLLM's "gguf" is the same idea; it has no CPU names for the other two.
QUANTIZATIONS = ("gguf", "int8", "int4")
# vLLM's names of the KV storage formats; layers/kv_cache.py stores each and explains them.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8_per_token_head",
                   "int4_per_token_head", "int4_kivi")


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise KVCacheDtypeError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs, flowing down from `LLM(...)` to scheduler, block manager and runner."""

    # Fields with a "help" are `memshare` command-line flags (entrypoints/cli.py builds them from these);
    # "aliases" are vLLM's spellings of the same flag.
    model: str = field(default="smollm2-135m", metadata={"help": "registered name, HF directory or .gguf file"})
    kv_cache_memory: int | str = field(default="1GiB", metadata={
        "help": "KV budget, e.g. 512MiB, or bytes", "aliases": ("--kv-cache-memory-bytes",), "type": str})
    num_kv_blocks: int | None = field(default=None, metadata={
        "help": "explicit block count (overrides memory)", "aliases": ("--num-gpu-blocks-override",), "type": int})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences running at once"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "tokens per step"})
    max_model_len: int | None = field(default=None, metadata={"help": "longest sequence", "type": int})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "share full prompt blocks by hash"})
    device: str = field(default="auto", metadata={"help": "auto: CUDA when present, else CPU"})
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on CUDA, float32 on CPU"})
    quantization: str | None = field(default=None, metadata={
        "help": "weights kept quantized on CPU: gguf (a GGUF file's Q8_0/Q4_0/Q4_1 codes), int8 or int4 (per 32 "
        "inputs, quantized at load); default: float weights in dtype", "type": str, "choices": QUANTIZATIONS})
    # vLLM's names, listed in KV_CACHE_DTYPES; layers/kv_cache.py explains them.
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV storage, one of " + ", ".join(KV_CACHE_DTYPES) + "; replay, eval and bench take a "
        "comma-separated list and run every policy at each, at equal KV bytes"})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads; default: torch's count, lowered while other processes use this process's cores "
        "(engine/cpu_threads.py)", "type": int})
    # vLLM's name: "auto" runs memshare's own forward where the architecture has one, "transformers" the HF modules.
    model_impl: str = field(default="auto", metadata={
        "help": "auto: memshare's lean forward for Llama-family models; transformers: the HF modules",
        "choices": MODEL_IMPLS})
    # vLLM's names: "auto" loads the weights; "dummy" builds random ones from the config alone (models/loader.py).
    load_format: str = field(default="auto", metadata={
        "help": "auto: load the weights; dummy: random weights from the model's config alone (benchmarks)",
        "choices": LOAD_FORMATS})
    # vLLM's name: load no tokenizer; prompts are token ids, outputs carry token ids and empty text.
    skip_tokenizer_init: bool = field(default=False, metadata={
        "help": "load no tokenizer: prompts must be token ids, outputs carry token ids and empty text"})
    # vLLM's names. Not flags: the commands that sample have their own --seed.
    seed: int | None = None  # the engine's: requests without their own seed sample reproducibly; None: unseeded
    tokenizer: str | None = None  # a tokenizer from elsewhere (name, directory or hub id); None: the model's
    trust_remote_code: bool = False  # run the model repository's own code (transformers' trust_remote_code)
    revision: str | None = None  # the branch, tag or commit of a hub id
    download_dir: str | None = None  # the hub cache to download to and read from; None: HF_HUB_CACHE
    attention_backend: str = field(default="auto", metadata={
        "help": "auto: the C++ kernel on CPU, Triton on CUDA; triton on CPU needs TRITON_INTERPRET=1",
        "choices": ATTENTION_BACKENDS})
    # vLLM's name: True runs every decode step eagerly; False replays CUDA graphs of decode steps on CUDA.
    enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs: run every decode step eagerly"})
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
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {self.model_impl!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise QuantizationError(f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if not isinstance(self.share, ShareConfig):
            raise TypeError(f"share must be a ShareConfig, got {type(self.share).__name__}")
        registration(self.share.policy)
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
