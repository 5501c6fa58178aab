"""The Triton kernels under Triton's interpreter against a float64 torch reference, for every KV format."""

import pytest
import torch

pytest.importorskip("triton")

from memshare import LLM, SamplingParams, share_config
from memshare.layers import triton_attention as ta
from memshare.layers.attention import attention_backend
from memshare.layers.kv_cache import FORMATS, KVCache
from tests.conftest import MODEL, QUESTIONS

BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM, NUM_BLOCKS = 16, 2, 6, 32, 24  # 3 query heads per KV head: padded to 4
FORMAT_NAMES = list(FORMATS)


def filled_cache(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[KVCache, list[int], int]:
    """A cache whose blocks 0..9 are written full and block 10 half, through the engine's write path; returns
    (cache, full blocks, the partial block)."""
    torch.manual_seed(seed)
    cache = KVCache(FORMATS[name], 1, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"),
                    num_tail_blocks=2)
    slots = list(range(10 * BLOCK_SIZE)) + [10 * BLOCK_SIZE + i for i in range(BLOCK_SIZE // 2)]
    cache.begin_step(slots)
    key, value = (torch.randn(len(slots), KV_HEADS, HEAD_DIM) * 2 for _ in "kv")
    cache.write(0, torch.tensor(slots), key, value)
    return cache, list(range(10)), 10


def reference(q: torch.Tensor, cache: KVCache, table: list[int], context_len: int, scale: float) -> torch.Tensor:
    """float64 causal attention of the last len(q) positions over the dequantized context."""
    keys, values = (x[:context_len].double() for x in cache.gather(0, torch.tensor(table)))
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale
    query_pos = torch.arange(context_len - len(q), context_len).unsqueeze(1)
    scores.masked_fill_(torch.arange(context_len).unsqueeze(0) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def run_batch(cache: KVCache, seqs: list[tuple[list[int], int, int]], num_splits: int = 1) -> list[tuple]:
    """seqs: (block table, context length, new tokens). Returns (kernel output, reference) per sequence."""
    num_queries = [n for _, _, n in seqs]
    q = torch.randn(sum(num_queries), HEADS, HEAD_DIM).to(cache.dtype)
    width = max(len(t) for t, _, _ in seqs)
    tables = torch.tensor([t + [0] * (width - len(t)) for t, _, _ in seqs], dtype=torch.int32)
    query_start = torch.tensor([0, *torch.tensor(num_queries).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c for _, c, _ in seqs], dtype=torch.int32)
    block_q = ta.block_q_for(HEADS, KV_HEADS, max(num_queries))
    tile_seq, tile_q0 = ta.prefill_tiles(num_queries, block_q, q.device)
    out = ta.paged_attention(q, cache, 0, query_start, seq_lens, tables, tile_seq, tile_q0, block_q, 0.125,
                             num_splits)
    pairs = []
    for i, (table, context_len, _) in enumerate(seqs):
        rows = slice(query_start[i], query_start[i + 1])
        pairs.append((out[rows], reference(q[rows], cache, table, context_len, 0.125)))
    return pairs


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_decode_and_prefill_equal_the_reference(name: str) -> None:
    cache, full, partial = filled_cache(name)
    shared = [full[3], full[1], full[3], full[3]]  # a table with shared entries (MemShare's zero-copy reuse)
    seqs = [
        ([full[0]], 1, 1),  # a one-token context
        (shared + [partial], 4 * BLOCK_SIZE + 8, 1),  # decode over shared entries and a partial (tail) block
        (full[4:9] + [partial], 5 * BLOCK_SIZE + 5, 1),  # a ragged length: the partial block read to offset 5
        (full[:3], 40, 40),  # a prompt with nothing cached
        (full[5:8] + [partial], 3 * BLOCK_SIZE + 7, 23),  # chunked prefill over a cached prefix of 32 tokens
    ]
    for out, expected in run_batch(cache, seqs):
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["bfloat16", "fp8_e4m3"])
def test_bfloat16_model_reads_within_bfloat16_rounding(name: str) -> None:
    """A bfloat16 model, as on a GPU: bfloat16 queries and output, dequantized K/V (the interpreter dots in float32)."""
    cache, full, partial = filled_cache(name, dtype=torch.bfloat16)
    seqs = [(full[:2] + [partial], 2 * BLOCK_SIZE + 8, 1), (full[2:5], 40, 9)]
    for out, expected in run_batch(cache, seqs, num_splits=2):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["float32", "int8_per_token_head", "int4_kivi"])
def test_split_k_decode_equals_the_reference(name: str) -> None:
    cache, full, partial = filled_cache(name, seed=1)
    # Evicted entries leave a table with gaps in its logical positions: the kernel reads what the table holds.
    seqs = [(full + [partial], 10 * BLOCK_SIZE + 8, 1), (full[::3], 4 * BLOCK_SIZE, 1), ([full[2]], 3, 1)]
    for out, expected in run_batch(cache, seqs, num_splits=3):
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", [n for n in FORMAT_NAMES if not FORMATS[n].needs_tail])
def test_store_kernel_writes_what_the_torch_store_writes(name: str) -> None:
    torch.manual_seed(2)
    caches = [KVCache(FORMATS[name], 1, 4, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
              for _ in range(2)]
    slots = torch.tensor([5, 17, 0, 40, 63])
    key, value = torch.randn(5, KV_HEADS, HEAD_DIM) * 3, torch.randn(5, KV_HEADS, HEAD_DIM)
    key[2, 1] = 0.0  # an all-zero row: its scale is clamped, not 0
    caches[0].write(0, slots, key, value)
    padded = torch.cat([slots, torch.tensor([-1])])  # a padded row (slot -1) writes nothing
    ta.store_kv(caches[1], 0, padded, torch.cat([key, key[:1] + 1]), torch.cat([value, value[:1] + 1]))
    for torch_plane, triton_plane in zip(caches[0].layers[0], caches[1].layers[0]):
        assert torch.equal(torch_plane.codes, triton_plane.codes)
        if torch_plane.scale is not None:
            assert torch.equal(torch_plane.scale, triton_plane.scale)


def test_engine_on_triton_gives_the_default_backends_tokens_with_sharing_on_static_buffers() -> None:
    """The Triton backend end to end on smollm2-135m: prefill eagerly, decode on the CUDA-graph buffers (without
    capture on a CPU), while random sharing edits the block tables between steps."""
    share = share_config("random", share_ratio=1.0, seed=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    settings = dict(num_kv_blocks=64, block_size=2, max_num_seqs=3, share=share, log_stats_interval=1e9)
    expected = LLM(MODEL, **settings)
    triton_llm = LLM(MODEL, attention_backend="triton", **settings)
    runner = triton_llm.llm_engine.model_runner
    runner.graphs = runner.decode_graphs(capture=False)
    outputs = [llm.generate(QUESTIONS[:2], params, use_tqdm=False) for llm in (expected, triton_llm)]
    assert [o.outputs[0].token_ids for o in outputs[0]] == [o.outputs[0].token_ids for o in outputs[1]]
    assert triton_llm.stats()["blocks_shared"] >= 2  # the tables were edited while decoding


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention_backend("triton", torch.device("cpu"))
    assert attention_backend("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(MODEL, attention_backend="flash")
