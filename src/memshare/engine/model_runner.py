import logging
from itertools import accumulate

import torch

from memshare.config import EngineConfig, parse_memory
from memshare.engine.cpu_threads import ThreadGovernor
from memshare.engine.cuda_graphs import DecodeGraphs
from memshare.engine.sequence import Sequence
from memshare.errors import KVCacheTooSmallError
from memshare.layers.attention import (
    AttentionMetadata,
    PagedContext,
    PrefillSpan,
    VarlenMetadata,
    attention_backend,
    triton_ops,
)
from memshare.layers.cpu_kernels import cpu_ops
from memshare.layers.kv_cache import KVCache, TailPool, block_bytes, kv_format
from memshare.layers.linear import prepack_linear_layers
from memshare.layers.sampler import Penalties, Sampler, SamplingBatch
from memshare.models.loader import kv_geometry, load_model
from memshare.models.registry import key_unrotation, lean_model

logger = logging.getLogger("memshare")


def kv_block_bytes(config: EngineConfig) -> int:
    """Bytes of one KV block of `config`'s model in its `kv_cache_dtype`, from the model's config alone."""
    kv = kv_geometry(config)
    fmt = kv_format(config.kv_cache_dtype, kv.dtype, kv.head_dim)
    return block_bytes(fmt, kv.num_layers, config.block_size, kv.num_kv_heads, kv.head_dim)


def sampling_batch(seqs: list[Sequence], eos_token_ids: list[int], device: torch.device) -> SamplingBatch:
    """What the sampler needs of `seqs`, one row each: their sampling parameters as tensors on `device`, the token
    teacher forcing produces, the stop tokens banned before `min_tokens` (`eos_token_ids` too unless `ignore_eos`),
    seeded generators, logprobs, logits-processor calls (each with its own copy of the output token ids), and the
    penalties with the token ids they count where any row uses one."""
    params = [s.params for s in seqs]
    # One host-to-device copy per dtype; float32 values round from float64 exactly as from Python floats.
    floats = torch.tensor([[1.0 if p.greedy else p.temperature, p.top_p, p.min_p] for p in params], dtype=torch.float64,
                          device=device)
    ints = torch.tensor([[p.top_k, p.forced_token_ids[s.num_output_tokens] if p.forced_token_ids else -1, p.greedy]
                         for s, p in zip(seqs, params)], dtype=torch.long, device=device)
    return SamplingBatch(
        temperatures=floats[:, 0].float(), top_ks=ints[:, 0], top_ps=floats[:, 1], min_ps=floats[:, 2].float(),
        greedy=ints[:, 2].bool(), forced_token_ids=ints[:, 1], generators=[s.generator for s in seqs],
        logprobs=[p.logprobs for p in params],
        banned_token_ids=[p.stop_token_ids + ([] if p.ignore_eos else eos_token_ids)
                          if s.num_output_tokens < p.min_tokens else [] for s, p in zip(seqs, params)],
        logits_processors=[[(f, s.output_token_ids) for f in p.logits_processors] for s, p in zip(seqs, params)],
        penalties=penalties(seqs, device))


def penalties(seqs: list[Sequence], device: torch.device) -> Penalties | None:
    """The penalties of `seqs`, None when none uses one; a row counts its prompt only for a repetition penalty."""
    params = [s.params for s in seqs]
    used = [p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params]
    if not any(used):
        return None
    prompts = [s.token_ids[: s.num_prompt_tokens] if p.repetition_penalty != 1 else [] for s, p in zip(seqs, params)]
    outputs = [s.output_token_ids if u else [] for s, u in zip(seqs, used)]
    values = torch.tensor([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params],
                          dtype=torch.float32, device=device)
    return Penalties(values[:, 0], values[:, 1], values[:, 2], padded(prompts, -1, device), padded(outputs, -1, device))


def padded(rows: list[list[int]], fill: int, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`rows` as one [len(rows), longest] tensor, short rows filled with `fill`."""
    width = max(map(len, rows), default=0)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=dtype, device=device).view(
        len(rows), width)  # [B, 0] when every row is empty


class ModelRunner:
    """Owns the model and the paged KV cache; packs a scheduled batch, runs it, samples."""

    def __init__(self, config: EngineConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.block_size = config.block_size
        kv = kv_geometry(config)
        self.kv_format = kv_format(config.kv_cache_dtype, kv.dtype, kv.head_dim)  # refused before any allocation
        self.model, self.tokenizer, self.device = load_model(config)
        # Unless fixed, CPU threads follow the load other processes put on this process's cores.
        self.thread_governor = (ThreadGovernor(torch.get_num_threads())
                                if self.device.type == "cpu" and not config.num_threads else None)
        # Cached keys with RoPE undone (policies get it through ModelAccess); a sharing policy on a model whose
        # rotation memshare cannot undo is refused here, a dense run only if something calls it.
        self.unrotate_keys = key_unrotation(self.model, strict=config.share.policy != "none")
        self.paged_model = lean_model(self.model, config.model_impl)
        prepack_linear_layers(self.paged_model or self.model, config.quantization)
        self.num_layers, self.num_kv_heads, self.head_dim = kv.num_layers, kv.num_kv_heads, kv.head_dim
        text_config = self.model.config.get_text_config()
        self.max_position_embeddings = text_config.max_position_embeddings
        self.num_heads = text_config.num_attention_heads
        self.attention_backend = attention_backend(config.attention_backend, self.device)
        dtype = self.model.dtype
        self.block_bytes = block_bytes(self.kv_format, self.num_layers, self.block_size, self.num_kv_heads,
                                       self.head_dim)
        self.num_kv_blocks, num_tail_blocks = self._num_blocks(config)
        if self.num_kv_blocks < 1 or (self.kv_format.needs_tail and num_tail_blocks < 1):
            tail = " beside the 8-bit tail block a running sequence needs" if self.kv_format.needs_tail else ""
            raise KVCacheTooSmallError(f"kv_cache_memory={config.kv_cache_memory!r} holds no block of "
                                       f"{self.block_bytes} bytes{tail}")
        self.kv_cache = KVCache(self.kv_format, self.num_layers, self.num_kv_blocks, self.block_size,
                                self.num_kv_heads, self.head_dim, dtype, self.device, num_tail_blocks)
        if self.device.type == "cpu" and dtype == torch.float32:
            cpu_ops()  # compile or load the kernels now, not in the middle of the first request
        eos = self.model.generation_config.eos_token_id
        # Without a tokenizer (skip_tokenizer_init) the model's generation config alone names the EOS tokens.
        self.eos_token_ids = {getattr(self.tokenizer, "eos_token_id", None), *(eos if isinstance(eos, list) else [eos])}
        self.eos_token_ids.discard(None)
        self.capture_queries = False
        self.decode_queries: torch.Tensor | None = None  # [decodes, layers, heads, head_dim] of the last step
        # Logprobs carry no decoded text without a tokenizer, as in vLLM.
        decode = (lambda t: None) if self.tokenizer is None else (lambda t: self.tokenizer.decode([t]))
        # vLLM's engine seed: requests without their own seed sample reproducibly from one engine generator.
        generator = None if config.seed is None else torch.Generator(self.device).manual_seed(config.seed)
        self.sampler = Sampler(decode, generator)
        self.graphs = self.decode_graphs() if self._graphs_apply(config) else None

    def _graphs_apply(self, config: EngineConfig) -> bool:
        """CUDA graphs need every op of a decode step on the device: the Triton backend, the lean forward, and a
        format without a tail (whose writes are planned on the host)."""
        return (self.device.type == "cuda" and not config.enforce_eager and self.attention_backend == "triton"
                and self.paged_model is not None and not self.kv_format.needs_tail)

    def decode_graphs(self, capture: bool = True) -> DecodeGraphs:
        """Decode steps on static buffers at bucketed batch sizes, replayed from CUDA graphs when `capture`."""
        config = self.config
        max_len = min(self.max_position_embeddings, config.max_model_len or 1 << 62,
                      self.num_kv_blocks * self.block_size)
        paged = PagedContext(self.kv_cache, None, None, self.attention_backend)
        logger.info("capturing CUDA graphs of decode steps" if capture else "decode steps on static buffers")
        return DecodeGraphs(self.forward, paged, config.max_num_seqs, -(-max_len // self.block_size),
                            self.num_heads, capture)

    def _num_blocks(self, config: EngineConfig) -> tuple[int, int]:
        """(KV blocks, tail blocks) of the budget. A per-channel format keeps each running sequence's partial block
        in a tail (layers/kv_cache.py); a running sequence holds a block, so min(max_num_seqs, blocks) tail slots
        always suffice. Both are paid from `kv_cache_memory`."""
        needs_tail = self.kv_format.needs_tail
        if config.num_kv_blocks:
            return config.num_kv_blocks, min(config.max_num_seqs, config.num_kv_blocks) if needs_tail else 0
        budget = parse_memory(config.kv_cache_memory)
        if not needs_tail:
            return budget // self.block_bytes, 0
        tail = TailPool.block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim)
        num_tails = min(config.max_num_seqs, budget // (self.block_bytes + tail))
        num_blocks = (budget - num_tails * tail) // self.block_bytes
        return (num_blocks if num_tails == config.max_num_seqs else num_tails), num_tails

    @torch.inference_mode()
    def embed_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """The model's input embeddings of `token_ids`: [n, hidden]."""
        return self.model.get_input_embeddings()(self._tensor(token_ids))

    def _tensor(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids, positions and attention metadata; decodes (one new token) come first in `batch`."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        for seq, num_new in batch:
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            # Cache slots skip evicted blocks; positions (and so RoPE) stay those of the full sequence.
            start = seq.num_cached_kv_tokens
            end = start + num_new
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            num_blocks = -(-end // bs)
            tables.append(table[:num_blocks])
            seq_lens.append(end)
            if num_new == 1:
                decode_tables.append(tables[-1])
                decode_lens.append(end)
                continue
            mask = None
            if start:
                key_pos = torch.arange(end, device=self.device)
                query_pos = torch.arange(start, end, device=self.device).unsqueeze(1)
                mask = key_pos.unsqueeze(0) <= query_pos
            prefills.append(PrefillSpan(len(input_ids) - num_new, len(input_ids), end,
                                        self._tensor(table[:num_blocks]), mask))
        self.kv_cache.begin_step(slots)
        decode_table_tensor = padded(decode_tables, 0, self.device)
        meta = AttentionMetadata(self._tensor(slots), len(decode_tables), decode_table_tensor,
                                 self._tensor(decode_lens), prefills)
        if self.attention_backend == "triton":
            meta.varlen = self._varlen(tables, seq_lens, [n for _, n in batch])
        return self._tensor(input_ids), self._tensor(positions), meta

    def _varlen(self, tables: list[list[int]], seq_lens: list[int], num_queries: list[int]) -> VarlenMetadata:
        ops, int32 = triton_ops(), torch.int32
        block_tables = padded(tables, 0, self.device, int32)
        max_queries = max(num_queries)
        block_q = ops.block_q_for(self.num_heads, self.num_kv_heads, max_queries)
        if max_queries == 1:
            tile_seq, tile_q0 = ops.decode_tiles(len(tables), self.device)
            num_splits = ops.num_splits_for(len(tables), self.num_kv_heads, block_tables.shape[1], self.device)
        else:  # split-K is for decode-only batches, as in vLLM's unified kernel
            tile_seq, tile_q0 = ops.prefill_tiles(num_queries, block_q, self.device)
            num_splits = 1
        return VarlenMetadata(self._tensor([0, *accumulate(num_queries)], int32), self._tensor(seq_lens, int32),
                              block_tables, tile_seq, tile_q0, block_q, num_splits)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_rows: torch.Tensor,
                paged: PagedContext) -> torch.Tensor:
        """Logits [len(logits_rows), vocab] of the flat batch, through the lean forward where there is one."""
        if self.paged_model is not None:
            return self.paged_model(input_ids, positions, logits_rows, paged)
        out = self.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                         logits_to_keep=logits_rows, paged=paged)
        return out.logits[0]

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], list[int], list]:
        """Run one step; returns the sequences that reached their last token with their sampled tokens."""
        if self.thread_governor is not None:
            self.thread_governor.update()
        input_ids, positions, meta = self.prepare(batch)
        last_rows, sampled = [], []
        row = 0
        for seq, num_new in batch:
            row += num_new
            if seq.num_computed_tokens + num_new == seq.num_tokens:
                last_rows.append(row - 1)
                sampled.append(seq)
        queries: list[torch.Tensor] | None = [] if self.capture_queries else None
        if self.graphs is not None and queries is None and not meta.prefills and self.graphs.bucket(len(batch)):
            logits = self.graphs.run(input_ids, positions, meta)
        else:
            paged = PagedContext(self.kv_cache, meta, queries, self.attention_backend)
            logits = self.forward(input_ids, positions, self._tensor(last_rows), paged)
        self.decode_queries = torch.stack(queries, 1) if queries and meta.num_decodes else None
        if not sampled:
            return [], [], []
        tokens, logprobs = self.sampler(logits, sampling_batch(sampled, sorted(self.eos_token_ids), logits.device))
        return sampled, tokens, logprobs
