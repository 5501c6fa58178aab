"""Paged attention over scattered blocks equals dense causal attention over the same keys and values."""

import copy

import pytest
import torch

from memshare.layers import cpu_kernels, fused
from memshare.layers.attention import AttentionMetadata, PrefillSpan, decode_attention, prefill_attention
from memshare.layers.kv_cache import KVCache, kv_format
from memshare.layers.linear import prepack_linear_layers

BLOCK_SIZE, KV_HEADS, HEADS, DIM, NUM_BLOCKS = 4, 2, 6, 8, 64


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """Float64 reference: q [n, heads, d] at positions first_pos.., k/v [L, kv_heads, d]."""
    group = HEADS // KV_HEADS
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * DIM**-0.5
    query_pos = torch.arange(first_pos, first_pos + q.shape[0]).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def scatter(length: int, generator: torch.Generator, cache: KVCache, free: list[int]):
    """A sequence of `length` random tokens written into free blocks; returns its table and dequantized K, V."""
    table = [free.pop() for _ in range(-(-length // BLOCK_SIZE))]
    k = torch.randn(length, KV_HEADS, DIM, generator=generator)
    v = torch.randn(length, KV_HEADS, DIM, generator=generator)
    slots = [table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE for pos in range(length)]
    cache.begin_step(slots)
    cache.write(0, torch.tensor(slots), k, v)
    stored_k, stored_v = cache.gather(0, torch.tensor(table))
    return table, stored_k[:length], stored_v[:length]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16", "fp8_e5m2", "int8_per_token_head",
                                            "int4_per_token_head", "int4_kivi"])
@pytest.mark.parametrize("path", ["cpu_kernel", "torch"])
def test_paged_attention_matches_dense(path, kv_cache_dtype, monkeypatch):
    """Decode (the C++ kernel dequantizing in registers, or the torch fallback) and prefill over a quantized cache
    equal attention over the dequantized K/V in float64; the partial tail blocks of int4_kivi included."""
    if path == "torch":
        monkeypatch.setattr(cpu_kernels, "cpu_ops", lambda: None)
    else:
        assert cpu_kernels.cpu_ops() is not None, "the CPU kernels must compile on this machine"
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(kv_format(kv_cache_dtype, torch.float32), 1, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM,
                    torch.float32, torch.device("cpu"), num_tail_blocks=4)
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    lengths = [5, 9, 1, 16, 130]
    seqs = [scatter(n, generator, cache, free) for n in lengths]
    width = max(len(t) for t, _, _ in seqs)
    tables = torch.tensor([t + [0] * (width - len(t)) for t, _, _ in seqs])
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), len(seqs), tables, torch.tensor(lengths), [])
    q = torch.randn(len(seqs), HEADS, DIM, generator=generator)
    out = decode_attention(q, cache, 0, meta, DIM**-0.5)
    for row, (n, (_, k, v)) in enumerate(zip(lengths, seqs)):
        expected = dense_attention(q[row : row + 1], k, v, n - 1)
        torch.testing.assert_close(out[row : row + 1].double(), expected, atol=1e-5, rtol=1e-5)
    # Fewer sequences than threads split by KV head instead, a long context into parts combined afterwards: same
    # results.
    for row in (1, 4):
        single = AttentionMetadata(meta.slot_mapping, 1, tables[row : row + 1], meta.decode_context_lens[row : row + 1],
                                   [])
        torch.testing.assert_close(decode_attention(q[row : row + 1], cache, 0, single, DIM**-0.5), out[row : row + 1])

    table, k, v = seqs[3]
    for start in (0, 6):  # a fresh prompt, and a chunk after 6 cached tokens
        q = torch.randn(16 - start, HEADS, DIM, generator=generator)
        mask = None if start == 0 else torch.arange(16).unsqueeze(0) <= torch.arange(start, 16).unsqueeze(1)
        span = PrefillSpan(0, 16 - start, 16, torch.tensor(table), mask)
        out = prefill_attention(q, cache, 0, span, DIM**-0.5)
        torch.testing.assert_close(out.double(), dense_attention(q, k, v, start), atol=1e-5, rtol=1e-5)


def test_packed_linear_matches_linear_and_replaces_every_linear():
    generator = torch.Generator().manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8, bias=False))
    model = copy.deepcopy(reference).eval()
    x = torch.randn(3, 5, 24, generator=generator)
    with torch.inference_mode():
        assert prepack_linear_layers(model) == 2
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        for rows in (x, x[0], x[:, 1]):  # 3-d, 2-d, and a strided view
            torch.testing.assert_close(model(rows), reference(rows), atol=1e-5, rtol=1e-5)
    assert prepack_linear_layers(reference.double()) == 0, "only float32 on CPU is packed"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.double().chunk(2, dim=-1)
    return x.double() * cos.double()[:, None] + torch.cat((-second, first), dim=-1) * sin.double()[:, None]


@pytest.mark.parametrize("path", ["cpu_kernel", "torch"])
def test_fused_layer_ops_match_float64_reference(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(cpu_kernels, "cpu_ops", lambda: None)
    else:
        assert cpu_kernels.cpu_ops() is not None, "the CPU kernels must compile on this machine"
    generator = torch.Generator().manual_seed(0)
    tokens, hidden, eps = 5, 24, 1e-6
    x, residual, weight = (torch.randn(tokens, hidden, generator=generator) for _ in range(3))
    weight = weight[0]

    def norm_reference(y: torch.Tensor) -> torch.Tensor:
        y = y.double()
        return weight.double() * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)

    close(fused.rms_norm(x, weight, eps), norm_reference(x))
    expected_residual = x.double() + residual.double()
    normed, new_residual = fused.fused_add_rms_norm(x.clone(), residual.clone(), weight, eps)
    close(new_residual, expected_residual)
    close(normed, norm_reference(expected_residual))

    # q and k are strided views of one fused QKV output, as in the lean forward.
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, generator=generator)
    q, k, _ = qkv.clone().split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    angles = torch.randn(tokens, DIM // 2, generator=generator).repeat(1, 2)
    rotated_q, rotated_k = fused.rotary_embedding(q.view(tokens, HEADS, DIM), k.view(tokens, KV_HEADS, DIM),
                                                  angles.cos(), angles.sin())
    q0, k0, _ = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    close(rotated_q, rotate_reference(q0.view(tokens, HEADS, DIM), angles.cos(), angles.sin()))
    close(rotated_k, rotate_reference(k0.view(tokens, KV_HEADS, DIM), angles.cos(), angles.sin()))

    gate_up = torch.randn(tokens, 2 * hidden, generator=generator)
    gate, up = gate_up.double().chunk(2, dim=-1)
    close(fused.silu_and_mul(gate_up), gate * torch.sigmoid(gate) * up)
