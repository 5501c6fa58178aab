"""Decode steps replayed from CUDA graphs at bucketed batch sizes (vLLM's and nano-vllm's approach).

A decode step of a small model on a GPU is mostly kernel-launch overhead; a graph launches the whole forward at
once. Each bucket's graph reads its inputs from static buffers: the step's token ids, positions, slots, context
lengths and block tables are copied in before a replay. Sharing and eviction only change block tables, which are
inputs, so a replay always attends through the current tables. Rows past the batch are padding: slot -1 (the
store skips it) and context length 0 (attention reads nothing).

Without CUDA (`capture=False`) the same buffers run the forward eagerly, which is how the padding is tested on
a CPU.
"""

from collections.abc import Callable

import torch

from memshare.layers.attention import AttentionMetadata, PagedContext, VarlenMetadata, triton_ops

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PagedContext], torch.Tensor]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (and max_num_seqs itself)."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return small + list(range(16, max_num_seqs, 16)) + [max_num_seqs]


class DecodeGraphs:
    """Static input buffers and one decode graph per bucket."""

    def __init__(self, forward: Forward, paged: PagedContext, max_num_seqs: int, max_blocks: int,
                 num_heads: int, capture: bool) -> None:
        self.forward, self.paged, self.capture = forward, paged, capture
        cache = paged.kv_cache
        device = cache.lut.device
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = max_blocks
        n = self.buckets[-1]

        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids, self.positions = zeros(n, dtype=torch.long), zeros(n, dtype=torch.long)
        self.slots = torch.full((n,), -1, dtype=torch.int32, device=device)  # warm-up and capture write nothing
        self.seq_lens, self.block_tables = zeros(n), zeros(n, max_blocks)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, device=device)
        ops = triton_ops()
        self.block_q = ops.block_q_for(num_heads, cache.num_kv_heads, 1)
        self.tile_seq, self.tile_q0 = ops.decode_tiles(n, device)
        self.splits = {b: ops.num_splits_for(b, cache.num_kv_heads, max_blocks, device) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def _context(self, bs: int) -> PagedContext:
        varlen = VarlenMetadata(self.query_start[: bs + 1], self.seq_lens[:bs], self.block_tables[:bs],
                                self.tile_seq[:bs], self.tile_q0[:bs], self.block_q, self.splits[bs])
        meta = AttentionMetadata(self.slots[:bs], bs, self.block_tables[:bs], self.seq_lens[:bs], [], varlen)
        return PagedContext(self.paged.kv_cache, meta, None, self.paged.backend)

    def _eager(self, bs: int) -> torch.Tensor:
        return self.forward(self.input_ids[:bs], self.positions[:bs], self.rows[:bs], self._context(bs))

    def _capture_all(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # the largest first: the smaller graphs reuse its memory pool
            self._eager(bs)  # warm up: Triton compiles and autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._eager(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only batch of B <= max_num_seqs sequences."""
        num_seqs = input_ids.shape[0]
        bs = self.bucket(num_seqs)
        tables = meta.varlen.block_tables
        self.input_ids[:num_seqs] = input_ids
        self.positions[:num_seqs] = positions
        self.slots.fill_(-1)
        self.slots[:num_seqs] = meta.slot_mapping
        self.seq_lens.zero_()
        self.seq_lens[:num_seqs] = meta.varlen.seq_lens
        self.block_tables[:num_seqs, : tables.shape[1]] = tables
        if not self.capture:
            return self._eager(bs)[:num_seqs]
        self.graphs[bs].replay()
        return self.outputs[bs][:num_seqs]
