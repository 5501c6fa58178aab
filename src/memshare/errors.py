class MemShareError(Exception):
    """Base class of the errors memshare raises on bad input or configuration."""


class UnknownModelError(MemShareError, ValueError):
    """The model is neither a registered short name, a Hugging Face directory, nor a GGUF file; or it lacks what the
    options ask of it (a config-only shape without `load_format="dummy"`, no tokenizer files without
    `skip_tokenizer_init=True`)."""


class ChecksumError(MemShareError):
    """A registered model file does not match its pinned sha256."""


class PromptTooLongError(MemShareError, ValueError):
    """The prompt does not fit the model's context (`max_model_len`)."""


class KVCacheTooSmallError(MemShareError, ValueError):
    """The KV-cache budget cannot hold even one request of the given size."""


class KVCacheDtypeError(MemShareError, ValueError):
    """An unknown `kv_cache_dtype`, or one the model's heads cannot be stored in."""


class QuantizationError(MemShareError, ValueError):
    """Quantized weights that cannot load: `quantization="gguf"` on a model that is not a GGUF file or carries no
    linear weights in a format memshare runs, or any quantization off a float32 CPU with memshare's AVX2 kernels."""


class UnsupportedDtypeError(MemShareError, ValueError):
    """A model `dtype` this machine cannot run at speed: bfloat16 on a CPU without AVX512_BF16 or AMX."""


class UnsupportedRotaryError(MemShareError, ValueError):
    """A sharing policy on a model whose rotary embeddings memshare cannot undo on cached keys (interleaved or
    partial rotation, a rope type whose angles are not the position's alone); dense runs of the model are fine."""


class UnsupportedOptionError(MemShareError, TypeError, ValueError):
    """An engine option memshare does not take: a vLLM option it has no counterpart for, a value of one it supports
    only in part (`tensor_parallel_size=2`), or a typo. The message names the option and what to use instead. A
    TypeError like any unexpected keyword argument, and a ValueError for a value out of reach."""


class SamplingParamsError(MemShareError, ValueError):
    """A `SamplingParams` field out of its range; the message names the field."""


class SamplingParamsTypeError(SamplingParamsError, TypeError):
    """A `SamplingParams` field of the wrong type; the message names the field and the type it takes."""
