"""MemShare: a paged-KV inference engine whose KV blocks can be shared by reference count."""

from memshare.config import EngineConfig, ShareConfig
from memshare.entrypoints.llm import LLM
from memshare.errors import (
    ChecksumError,
    KVCacheTooSmallError,
    MemShareError,
    PromptTooLongError,
    UnknownModelError,
)
from memshare.outputs import CompletionOutput, Logprob, RequestOutput
from memshare.sampling_params import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineConfig", "ShareConfig",
    "MemShareError", "UnknownModelError", "ChecksumError", "PromptTooLongError", "KVCacheTooSmallError",
]
