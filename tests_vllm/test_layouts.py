"""Stage 2 reads every KV layout vLLM 0.32 allocates: caches built with vLLM's own view and write functions, random K/V
written in, read back exactly (fp8: exactly its rounding), and the stage-2 sums equal those of the plain tensors."""

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from memshare.sharing.stage2 import partial_sums, similarity
from memshare.vllm_plugin import _vllm_api as api
from memshare.vllm_plugin.kv_layout import CellLayout, LayerKV, distinct_storages
from tests_vllm.conftest import skip_unless_cpu_runs_it

HEADS, HEAD_SIZE, BLOCKS = 2, 64, 7
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def views(layout: KVCacheLayout, block_size: int, kernel_block_size: int | None, dtype: torch.dtype,
          layers: int = 2) -> list[torch.Tensor]:
    """Per-layer logical views [kernel blocks, H, T, 2D] of one raw allocation, as vLLM's allocate_kv_cache makes."""
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=dtype)
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, layers, layout)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    tensor = KVCacheTensor(size=spec.page_size_bytes * BLOCKS * layers, layers=names, layer_stride=layer_stride,
                           block_stride=block_stride)
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    return create_kv_cache_views(raw, spec, BLOCKS, layout, tensor, kernel_block_size=kernel_block_size)


def write_split(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_ids: list[int],
                fp8: torch.dtype | None = None) -> None:
    """As GPU backends write: cache.transpose(1, 2).split(head_size, -1), kernel blocks grouped per scheduler block;
    fp8 values cast and stored as their bytes (vLLM's uint8 cache)."""
    grouped = cache.unflatten(0, (BLOCKS, -1))  # [B, r, H, T, C]
    for n, block in enumerate(block_ids):
        k, v = keys[n].unflatten(0, (grouped.shape[1], -1)), values[n].unflatten(0, (grouped.shape[1], -1))
        key_cache, value_cache = grouped[block].transpose(1, 2).split(HEAD_SIZE, dim=-1)  # [r, T, H, D]
        key_cache.copy_(k.to(fp8).view(torch.uint8) if fp8 else k.to(cache.dtype))
        value_cache.copy_(v.to(fp8).view(torch.uint8) if fp8 else v.to(cache.dtype))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("layout", list(KVCacheLayout))
@pytest.mark.parametrize("block_size,kernel_block_size", [(16, None), (64, 16)])
def test_gpu_layouts_round_trip(layout, block_size, kernel_block_size, kv_cache_dtype):
    """FlashAttention, FlashInfer, Triton: K then V on the content axis, in every stride order and kernel split; fp8
    caches (uint8 storage) read back as their fp8 values times the layer's k/v scales."""
    fp8 = FP8.get(kv_cache_dtype)
    try:
        caches = views(layout, block_size, kernel_block_size, torch.uint8 if fp8 else torch.float32)
    except ValueError as refused:  # vLLM refuses kernel splits of non-dense pages; so do its backends
        assert kernel_block_size is not None and "kernel blocks" in str(refused)
        pytest.skip(f"vLLM refuses this split: {refused}")
    tokens = caches[0].shape[2]
    cell = CellLayout.split_content(tokens, HEAD_SIZE, HEAD_SIZE)
    block_ids = [5, 1, 3]
    k_scale, v_scale = (0.5, 2.0) if fp8 else (1.0, 1.0)
    for cache in caches:
        keys, values = torch.randn(2, len(block_ids), block_size, HEADS, HEAD_SIZE)
        write_split(cache, keys / k_scale, values / v_scale, block_ids, fp8)
        read_keys, read_values = LayerKV("l", cache, BLOCKS, cell, fp8, k_scale, v_scale).read(torch.tensor(block_ids))
        if fp8:  # exactly the stored fp8 values, scaled
            keys, values = (keys / k_scale).to(fp8).float() * k_scale, (values / v_scale).to(fp8).float() * v_scale
        assert torch.equal(read_keys, keys) and torch.equal(read_values, values)


CPU_CASES = [("vec", torch.float32, "auto"), ("vec", torch.float16, "auto"), ("vec16", torch.float32, "auto"),
             ("amx", torch.bfloat16, "auto"), ("vec", torch.float32, "fp8"), ("vec", torch.bfloat16, "fp8_e4m3"),
             ("vec", torch.float32, "fp8_e5m2"), ("amx", torch.bfloat16, "fp8"), ("amx", torch.bfloat16, "fp8_e5m2")]


@pytest.mark.parametrize("isa,dtype,kv_cache_dtype", CPU_CASES)
def test_cpu_attention_layouts_round_trip(isa, dtype, kv_cache_dtype):
    """CPU attention: the cell layout probed through vLLM's reshape-and-cache op reads back what the op wrote, and the
    stage-2 sums of what is read equal those of the (fp8-rounded) tensors."""
    block_size, fp8 = 32, FP8.get(kv_cache_dtype)
    cache = torch.zeros(BLOCKS, HEADS, block_size, 2 * HEAD_SIZE, dtype=torch.uint8 if fp8 else dtype)
    block_ids = [4, 0, 2, 6]
    keys, values = torch.randn(2, len(block_ids), block_size, HEADS, HEAD_SIZE).to(dtype)
    slots = (torch.tensor(block_ids).unsqueeze(1) * block_size + torch.arange(block_size)).flatten()
    with skip_unless_cpu_runs_it(f"{isa} attention with {kv_cache_dtype} KV"):
        cell = api.cpu_cell_layout(isa, kv_cache_dtype, dtype, cache, HEAD_SIZE)
        api.cpu_write(keys.flatten(0, 1), values.flatten(0, 1), cache, slots, isa, kv_cache_dtype)
    layer = LayerKV("l", cache, BLOCKS, cell, api.fp8_storage_dtype(kv_cache_dtype, cache.dtype))
    read_keys, read_values = layer.read(torch.tensor(block_ids))
    for read, written in ((read_keys, keys.float()), (read_values, values.float())):
        if fp8 is None:
            assert torch.equal(read, written)
        else:  # an fp8 value within one fp8 step of what was written (vLLM's CPU cast truncates)
            mantissa_bits = 3 if fp8 == torch.float8_e4m3fn else 2
            step = torch.exp2(written.abs().clamp_min(2**-6).log2().floor() - mantissa_bits)
            assert torch.equal(read.to(fp8).float(), read) and torch.all((read - written).abs() <= step)
    read = similarity(partial_sums(read_keys[None, :2], read_values[None, :2], read_keys[None, 2:],
                                   read_values[None, 2:]))
    plain = similarity(partial_sums(keys[None, :2].float(), values[None, :2].float(), keys[None, 2:].float(),
                                    values[None, 2:].float()))
    assert torch.allclose(read, plain, atol=0 if fp8 is None else 0.02)


def test_fp8_scales_are_applied():
    """A layer's k/v scales multiply what is stored: the per-layer metric sees K and V at their real magnitude."""
    cache = torch.zeros(BLOCKS, HEADS, 32, 2 * HEAD_SIZE, dtype=torch.uint8)
    with skip_unless_cpu_runs_it("an fp8 KV cache"):
        cell = api.cpu_cell_layout("vec", "fp8", torch.float32, cache, HEAD_SIZE)
    cache.view(torch.float8_e4m3fn).fill_(1.0)
    keys, values = LayerKV("l", cache, BLOCKS, cell, torch.float8_e4m3fn, k_scale=0.5, v_scale=4.0).read(
        torch.tensor([1]))
    assert torch.all(keys == 0.5) and torch.all(values == 4.0)


def test_aliased_layers_count_each_storage_once():
    """A layer reading another layer's cache (kv_sharing_target_layer_name) adds nothing to the similarity."""
    cache = views(KVCacheLayout.LBHNC, 16, None, torch.float32, layers=1)[0]
    cache.normal_()
    cell = CellLayout.split_content(16, HEAD_SIZE, HEAD_SIZE)
    owner, alias = LayerKV("layers.0", cache, BLOCKS, cell), LayerKV("layers.1", cache, BLOCKS, cell)
    kept = distinct_storages([owner, alias], {"layers.0": None, "layers.1": "layers.0"})
    assert [layer.name for layer in kept] == ["layers.0"]
