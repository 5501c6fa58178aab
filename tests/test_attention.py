"""Paged attention over scattered blocks equals dense causal attention over the same keys and values."""

import copy

import pytest
import torch

from memshare.layers import attention
from memshare.layers.attention import AttentionMetadata, PrefillSpan, decode_attention, prefill_attention
from memshare.layers.linear import prepack_linear_layers

BLOCK_SIZE, KV_HEADS, HEADS, DIM, NUM_BLOCKS = 4, 2, 6, 8, 32


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """Float64 reference: q [n, heads, d] at positions first_pos.., k/v [L, kv_heads, d]."""
    group = HEADS // KV_HEADS
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * DIM**-0.5
    query_pos = torch.arange(first_pos, first_pos + q.shape[0]).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def scatter(length: int, generator: torch.Generator, caches: tuple[torch.Tensor, torch.Tensor], free: list[int]):
    table = [free.pop() for _ in range(-(-length // BLOCK_SIZE))]
    k = torch.randn(length, KV_HEADS, DIM, generator=generator)
    v = torch.randn(length, KV_HEADS, DIM, generator=generator)
    for pos in range(length):
        caches[0][table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = k[pos]
        caches[1][table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = v[pos]
    return table, k, v


@pytest.mark.parametrize("path", ["cpu_kernel", "torch"])
def test_paged_attention_matches_dense(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(attention, "paged_decode_kernel", lambda: None)
    else:
        assert attention.paged_decode_kernel() is not None, "the CPU kernel must compile on this machine"
    generator = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM)
    caches = (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    lengths = [5, 9, 1, 16]
    seqs = [scatter(n, generator, caches, free) for n in lengths]
    width = max(len(t) for t, _, _ in seqs)
    tables = torch.tensor([t + [0] * (width - len(t)) for t, _, _ in seqs])
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), len(seqs), tables, torch.tensor(lengths), [])
    q = torch.randn(len(seqs), HEADS, DIM, generator=generator)
    out = decode_attention(q, *caches, meta, DIM**-0.5)
    for row, (n, (_, k, v)) in enumerate(zip(lengths, seqs)):
        expected = dense_attention(q[row : row + 1], k, v, n - 1)
        torch.testing.assert_close(out[row : row + 1].double(), expected, atol=1e-5, rtol=1e-5)
    # Fewer sequences than threads split by KV head instead: same results.
    single = AttentionMetadata(meta.slot_mapping, 1, tables[1:2], meta.decode_context_lens[1:2], [])
    torch.testing.assert_close(decode_attention(q[1:2], *caches, single, DIM**-0.5), out[1:2])

    table, k, v = seqs[3]
    for start in (0, 6):  # a fresh prompt, and a chunk after 6 cached tokens
        q = torch.randn(16 - start, HEADS, DIM, generator=generator)
        mask = None if start == 0 else torch.arange(16).unsqueeze(0) <= torch.arange(start, 16).unsqueeze(1)
        span = PrefillSpan(0, 16 - start, 16, torch.tensor(table), mask)
        out = prefill_attention(q, *caches, span, DIM**-0.5)
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
