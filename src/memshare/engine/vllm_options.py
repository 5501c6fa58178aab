"""vLLM's `LLM` options on memshare's engine: the ones with a meaning here become `EngineConfig` fields, every other
one (from vLLM 0.32's EngineArgs and LLM) is refused with what to use instead, a typo with the closest name."""

import difflib
import fnmatch
from dataclasses import fields
from typing import Any

from memshare.config import EngineConfig
from memshare.errors import UnsupportedOptionError

# vLLM's names of EngineConfig fields.
VLLM_ALIASES = {"kv_cache_memory_bytes": "kv_cache_memory", "num_gpu_blocks_override": "num_kv_blocks"}
_ONE_DEVICE = "memshare runs one model on one device; to serve on several, run vLLM with the memshare plugin " \
    "(README, 'Inside vLLM: the memshare plugin')"
# vLLM options memshare takes at one value only (vLLM's default, what memshare does anyway), and why not others.
VLLM_FIXED: dict[str, tuple[object, str]] = {
    "tensor_parallel_size": (1, _ONE_DEVICE), "pipeline_parallel_size": (1, _ONE_DEVICE),
    "data_parallel_size": (1, _ONE_DEVICE),
    "enable_chunked_prefill": (True, "memshare always splits long prompts into chunks of max_num_batched_tokens"),
    "tokenizer_mode": ("auto", "memshare loads the tokenizer with transformers' AutoTokenizer"),
}
# vLLM's EngineArgs and LLM options memshare does not take (fnmatch patterns), and what to use instead.
VLLM_INSTEAD: tuple[tuple[str, str], ...] = (
    ("gpu_memory_utilization", "size the KV cache with kv_cache_memory (bytes or e.g. '4GiB') or num_kv_blocks"),
    ("swap_space cpu_offload_gb cpu_offload_params offload_* kv_offloading_*",
     "not supported: weights and KV cache stay on the device; size the KV cache with kv_cache_memory and fit more in "
     "it with a quantized kv_cache_dtype or a sharing policy (share=)"),
    ("quantization_config allow_deprecated_quantization",
     "not supported: quantization= takes gguf (a GGUF file's own codes), int8 or int4; kv_cache_dtype quantizes "
     "the KV cache"),
    ("distributed_executor_backend master_addr master_port nnodes node_rank *distributed_timeout_seconds numa_bind* "
     "device_ids *context_parallel_size dcp_* cp_kv_cache_interleave_size data_parallel_* enable_hc_sp "
     "enable_expert_parallel enable_ep_weight_filter *elastic_ep* eplb_config enable_eplb expert_placement_strategy "
     "enable_dbo ubatch_size dbo_* dp_sync_interval disable_nccl_for_dp_synchronization enable_batch_sharded_sampling "
     "max_parallel_loading_workers disable_custom_all_reduce enable_shm_tensor_arena ray_workers_use_nsight "
     "worker_cls worker_extension_cls *fault_tolerance* _api_process_* all2all_backend", _ONE_DEVICE),
    ("*lora*", "not supported: merge the LoRA adapter into the weights (peft's merge_and_unload), load that directory"),
    ("*mm_* limit_mm_per_prompt allowed_local_media_path allowed_media_domains interleave_mm_strings media_io_kwargs "
     "language_model_only video_pruning_* io_processor_plugin renderer_num_workers enable_prompt_embeds",
     "not supported: memshare runs text-only decoder models"),
    ("speculative_config spec_method spec_model spec_tokens", "not supported: memshare has no speculative decoding"),
    ("compilation_config cudagraph_capture_sizes max_cudagraph_capture_size max_seq_len_to_capture optimization_level "
     "performance_mode kernel_config ir_op_priority attention_config moe_backend linear_backend *_prefill_backend "
     "kda_decode_backend sparse_indexer_topk_backend enable_flashinfer_autotune",
     "memshare replays CUDA graphs of decode steps on CUDA (enforce_eager=True: none) and picks its attention "
     "kernels with attention_backend"),
    ("mamba_* *_mamba_* replayssm_buffer_len use_replayssm", "not supported: memshare runs attention-only models"),
    ("scheduling_policy scheduler_cls long_prefill_token_threshold* max_num_scheduled_tokens max_num_active_seqs "
     "max_num_queued_* watermark prefill_schedule_interval scheduler_reserve_full_isl async_scheduling stream_interval "
     "disable_chunked_mm_input disable_hybrid_kv_cache_manager disable_cascade_attn kv_sharing_fast_prefill "
     "swa_bounded_replay prefix_match_unit",
     "memshare schedules first come, first served with chunked prefill: bound a step with max_num_batched_tokens "
     "and max_num_seqs"),
    ("disable_sliding_window", "memshare always attends over the full context (it warns on sliding-window models)"),
    ("prefix_caching_hash_algo prefix_cache_retention_interval",
     "memshare hashes full prompt blocks; enable_prefix_caching=False turns prefix caching off"),
    ("log_level log_config_file logging_config otlp_traces_endpoint collect_detailed_traces *metrics* "
     "custom_histogram_buckets enable_layerwise_nvtx_tracing enable_logging_iteration_details jit_monitor_* "
     "enable_mm_processor_stats show_hidden_metrics_for_version aggregate_engine_logging profiler_config "
     "enable_trace_replay",
     "memshare logs to the 'memshare' logger (level: MEMSHARE_LOGGING_LEVEL), stats every log_stats_interval "
     "seconds (0: never); LLM.stats() returns the metrics"),
    ("tokenizer_revision code_revision",
     "pass tokenizer= a directory or hub id (its default branch); revision= picks the model's"),
    ("hf_token", "set HF_TOKEN in the environment: huggingface_hub reads it"),
    ("hf_overrides model_class_overrides hf_config_path config_format model_weights generation_config "
     "override_generation_config runner convert pooler_config safetensors_* pt_load_map_location "
     "model_loader_extra_config ignore_patterns use_tqdm_on_load",
     "memshare loads a model directory as transformers does: change its config.json or generation_config.json in a "
     "copy of the directory"),
    ("max_logprobs logprobs_mode", "memshare returns as many logprobs as a request asks (SamplingParams.logprobs), of "
     "the logits after processors and penalties, before temperature"),
    ("logits_processors", "pass per-request logits processors in SamplingParams(logits_processors=[...])"),
    ("served_model_name shutdown_timeout", "a server option: memshare serve --served-model-name / --shutdown-timeout"),
    ("structured_outputs_config reasoning_parser reasoning_parser_plugin reasoning_config aux_output_config "
     "watermark_config diffusion_config tokens_only enable_sleep_mode sleep_* enable_cumem_allocator "
     "enable_nccl_comm_suspend weight_transfer_config kv_transfer_config kv_events_config ec_transfer_config "
     "ec_manager_config engram_config additional_config fail_on_environ_validation enable_return_routed_experts "
     "return_sampling_mask kv_cache_dtype_skip_layers use_fp64_gumbel", "not supported by memshare"),
)


def _vllm_advice(name: str) -> str | None:
    return next((advice for names, advice in VLLM_INSTEAD if any(fnmatch.fnmatchcase(name, pattern)
                                                                    for pattern in names.split())), None)


def engine_config(model: str = "smollm2-135m", **kwargs: Any) -> EngineConfig:
    """The EngineConfig of `LLM(model, **kwargs)`: EngineConfig fields, and vLLM's names of them
    (kv_cache_memory_bytes, num_gpu_blocks_override, disable_log_stats, tensor_parallel_size=1, ...). Any other vLLM
    option, or a misspelt one, raises UnsupportedOptionError naming it and what to use instead."""
    accepted = {f.name for f in fields(EngineConfig)}
    options: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in accepted:
            options[name] = value
        elif name in VLLM_ALIASES:
            options[VLLM_ALIASES[name]] = value
        elif name == "disable_log_stats":  # vLLM's LLM defaults to no stats logging
            options["log_stats_interval"] = 0 if value else EngineConfig.log_stats_interval
        elif name in VLLM_FIXED:
            only, advice = VLLM_FIXED[name]
            if value != only:
                raise UnsupportedOptionError(f"{name}={value!r} is not supported, only {only!r}: {advice}")
        elif (advice := _vllm_advice(name)) is not None:
            raise UnsupportedOptionError(f"vLLM's {name} is not a memshare option: {advice}")
        else:
            known = [*accepted, *VLLM_ALIASES, *VLLM_FIXED, "disable_log_stats"]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; memshare takes {sorted(known)}"
            raise UnsupportedOptionError(f"LLM() got an unexpected keyword argument {name!r}{hint}")
    return EngineConfig(model=model, **options)
