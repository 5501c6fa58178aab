"""MemShare: a paged-KV inference engine whose KV blocks can be shared by reference count."""

from memshare.config import EngineConfig, ShareConfig, register_policy, share_config
from memshare.engine.llm import LLM
from memshare.errors import (
    ChecksumError,
    KVCacheDtypeError,
    KVCacheTooSmallError,
    MemShareError,
    PromptTooLongError,
    SamplingParamsError,
    SamplingParamsTypeError,
    UnknownModelError,
    UnsupportedOptionError,
    UnsupportedRotaryError,
)
from memshare.outputs import CompletionOutput, Logprob, RequestOutput
from memshare.sampling_params import SamplingParams
from memshare.sharing import H2OConfig, MemShareConfig, RandomShareConfig, RKVConfig, StreamingLLMConfig

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineConfig", "ShareConfig",
    "MemShareConfig", "RandomShareConfig", "StreamingLLMConfig", "H2OConfig", "RKVConfig", "share_config",
    "register_policy",
    "MemShareError", "UnknownModelError", "ChecksumError", "PromptTooLongError", "KVCacheTooSmallError",
    "KVCacheDtypeError", "UnsupportedRotaryError", "UnsupportedOptionError", "SamplingParamsError",
    "SamplingParamsTypeError",
]
