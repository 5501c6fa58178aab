"""Triton kernels for the paged KV cache: the store through the slot mapping and one paged attention kernel for
decode, prefill and chunked prefill over a cached prefix, reading every KV format of layers/kv_cache.py.

The attention kernel follows vLLM's unified Triton attention: a program takes a tile of query tokens of one
sequence times the query heads of one KV head (GQA folds the group into the tile's rows), walks the sequence's
block table `TILE_N` tokens at a time, dequantizes each row as it loads it (codes through a 256-entry table, then
scale and zero point), and keeps an online softmax. Shared or evicted entries are nothing special: the table says
which physical block holds a position. Decode-only batches split a long context over several programs (split-K)
and combine their partial softmax sums afterwards, so a few long sequences still fill the GPU.

On CPU these run under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check them.
"""

import torch
import triton
import triton.language as tl

from memshare.layers.kv_cache import KVCache, KVFormat

MODES = {"none": 0, "token": 1, "channel": 2}


@triton.jit
def _round_half_even(y):
    # torch.round's rule; libdevice's rint is not available to the interpreter.
    r = tl.floor(y + 0.5)
    return tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)


@triton.jit
def _fp16_scale(raw):
    # As layers/kv_cache.py stores it: rounded to float16, never below float16's smallest subnormal.
    return tl.maximum(raw.to(tl.float16).to(tl.float32), 2.0**-24)


@triton.jit
def _round_to_bfloat16(x):
    # Round to nearest even on the bits, so the cast after it is exact: the interpreter's cast truncates.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp8_code(y, lut_ptr, MAX_CODE: tl.constexpr):
    """The fp8 byte nearest y (ties to even), by binary search over the format's ascending positive codes; the
    interpreter's float-to-fp8 cast does not round, and this one path runs the same everywhere."""
    a = tl.abs(y)
    lo = tl.zeros(y.shape, tl.int32)
    hi = tl.full(y.shape, MAX_CODE, tl.int32)
    for _ in tl.static_range(7):
        mid = (lo + hi + 1) // 2
        below = tl.load(lut_ptr + mid) <= a
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    next_code = tl.minimum(lo + 1, MAX_CODE)
    down, up = a - tl.load(lut_ptr + lo), tl.load(lut_ptr + next_code) - a
    take_up = (lo < MAX_CODE) & ((up < down) | ((up == down) & (lo % 2 == 1)))
    code = tl.where(take_up, next_code, lo)
    return tl.where(y < 0, code | 128, code)


@triton.jit
def _store_rows(src, x_stride_h, codes_ptr, scale_ptr, lut_ptr, row, HEADS_P: tl.constexpr,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_DIM_P: tl.constexpr, CODE: tl.constexpr,
                LIMIT: tl.constexpr, FP8_MAX_CODE: tl.constexpr):
    """Quantize one token's [kv_heads, head_dim] into cache rows `row + head`, even and odd dims apart (the two
    nibbles of a 4-bit byte)."""
    head = tl.arange(0, HEADS_P)
    pair = tl.arange(0, HALF_DIM_P)
    mask = (head < NUM_KV_HEADS)[:, None] & (pair < HEAD_DIM // 2)[None, :]
    x = src + head[:, None] * x_stride_h + 2 * pair[None, :]
    even = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x + 1, mask=mask, other=0.0).to(tl.float32)
    rows = (row + head)[:, None]
    if CODE == 0:
        if codes_ptr.dtype.element_ty == tl.bfloat16:
            even, odd = _round_to_bfloat16(even), _round_to_bfloat16(odd)
        dst = codes_ptr + rows * HEAD_DIM + 2 * pair[None, :]
        tl.store(dst, even.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 1, odd.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.maximum(tl.max(tl.abs(even), 1), tl.max(tl.abs(odd), 1))
        scale = _fp16_scale(amax / LIMIT)
        tl.store(scale_ptr + row + head, scale.to(tl.float16), mask=head < NUM_KV_HEADS)
        low = tl.minimum(tl.maximum(even / scale[:, None], -LIMIT), LIMIT)
        high = tl.minimum(tl.maximum(odd / scale[:, None], -LIMIT), LIMIT)
        if CODE == 1:
            low = _round_half_even(low).to(tl.int8).to(tl.uint8, bitcast=True)
            high = _round_half_even(high).to(tl.int8).to(tl.uint8, bitcast=True)
        elif CODE == 2:
            low = (_round_half_even(low) + 8).to(tl.uint8)
            high = (_round_half_even(high) + 8).to(tl.uint8)
        else:
            low = _fp8_code(low, lut_ptr, FP8_MAX_CODE).to(tl.uint8)
            high = _fp8_code(high, lut_ptr, FP8_MAX_CODE).to(tl.uint8)
        if CODE == 2:
            tl.store(codes_ptr + rows * (HEAD_DIM // 2) + pair[None, :], low | (high << 4), mask=mask)
        else:
            tl.store(codes_ptr + rows * HEAD_DIM + 2 * pair[None, :], low, mask=mask)
            tl.store(codes_ptr + rows * HEAD_DIM + 2 * pair[None, :] + 1, high, mask=mask)


@triton.jit
def _store_kernel(key_ptr, value_ptr, key_stride_t, key_stride_h, value_stride_t, value_stride_h, slot_ptr,
                  k_codes, k_scale, v_codes, v_scale, lut_ptr, HEADS_P: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HALF_DIM_P: tl.constexpr, CODE: tl.constexpr, LIMIT: tl.constexpr,
                  FP8_MAX_CODE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # padded rows of a CUDA graph batch carry slot -1
        _store_rows(key_ptr + token * key_stride_t, key_stride_h, k_codes, k_scale, lut_ptr, slot * NUM_KV_HEADS,
                    HEADS_P, NUM_KV_HEADS, HEAD_DIM, HALF_DIM_P, CODE, LIMIT, FP8_MAX_CODE)
        _store_rows(value_ptr + token * value_stride_t, value_stride_h, v_codes, v_scale, lut_ptr,
                    slot * NUM_KV_HEADS, HEADS_P, NUM_KV_HEADS, HEAD_DIM, HALF_DIM_P, CODE, LIMIT, FP8_MAX_CODE)


@triton.jit
def _load_rows(codes_ptr, scale_ptr, zero_ptr, lut_ptr, tail_codes_ptr, tail_scale_ptr, tail_lut_ptr,
               phys, offset, tail, head, dims, pos_ok, dim_ok,
               BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BITS: tl.constexpr, MODE: tl.constexpr, ASYMMETRIC: tl.constexpr, HAS_TAIL: tl.constexpr):
    """float32 [TILE_N, HEAD_DIM_P]: the K or V rows of one head at (physical block, offset), dequantized."""
    row = (phys * BLOCK_SIZE + offset) * NUM_KV_HEADS + head
    valid = pos_ok[:, None] & dim_ok[None, :]
    if BITS >= 16:
        x = tl.load(codes_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        if BITS == 8:
            code = tl.load(codes_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=valid, other=0)
        else:
            packed = tl.load(codes_ptr + row[:, None] * (HEAD_DIM // 2) + (dims // 2)[None, :], mask=valid, other=0)
            code = (packed >> (4 * (dims % 2)).to(tl.uint8)[None, :]) & 15
        x = tl.load(lut_ptr + code.to(tl.int32))
        if MODE == 1:
            x = x * tl.load(scale_ptr + row, mask=pos_ok, other=0.0).to(tl.float32)[:, None]
            if ASYMMETRIC:
                x = x + tl.load(zero_ptr + row, mask=pos_ok, other=0.0).to(tl.float32)[:, None]
        elif MODE == 2:
            channel = (phys * NUM_KV_HEADS + head)[:, None] * HEAD_DIM + dims[None, :]
            x = x * tl.load(scale_ptr + channel, mask=valid, other=0.0).to(tl.float32)
            if ASYMMETRIC:
                x = x + tl.load(zero_ptr + channel, mask=valid, other=0.0).to(tl.float32)
    if HAS_TAIL:
        in_tail = tail >= 0
        tail_row = (tl.maximum(tail, 0) * BLOCK_SIZE + offset) * NUM_KV_HEADS + head
        tail_valid = valid & in_tail[:, None]
        tail_code = tl.load(tail_codes_ptr + tail_row[:, None] * HEAD_DIM + dims[None, :], mask=tail_valid, other=0)
        tail_scale = tl.load(tail_scale_ptr + tail_row, mask=pos_ok & in_tail, other=0.0).to(tl.float32)
        x = tl.where(in_tail[:, None], tl.load(tail_lut_ptr + tail_code.to(tl.int32)) * tail_scale[:, None], x)
    return x


@triton.jit
def _paged_attention_kernel(
        out_ptr, max_ptr, sum_ptr, q_ptr,
        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lut_ptr,
        tail_k_codes, tail_k_scale, tail_v_codes, tail_v_scale, tail_lut_ptr, tail_of_block,
        block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_seq_ptr, tile_q0_ptr,
        scale, table_stride, q_stride_t, q_stride_h,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, TILE_N: tl.constexpr,
        BITS: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr, ASYMMETRIC: tl.constexpr,
        HAS_TAIL: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_F32: tl.constexpr):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    query_start = tl.load(query_start_ptr + seq)
    num_queries = tl.load(query_start_ptr + seq + 1) - query_start
    context_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * GROUP_P)
    query = q0 + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_ok = (query < num_queries) & (rows % GROUP_P < GROUP)
    query_pos = context_len - num_queries + query  # causal: a query sees keys up to its own position
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    token = (query_start + query).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    visible_end = tl.minimum(context_len, context_len - num_queries + q0 + BLOCK_Q)
    # Each sequence's own context is cut into NUM_SPLITS ranges: a padded block table does not dilute the splits.
    blocks_per_split = tl.cdiv(tl.cdiv(visible_end, BLOCK_SIZE), NUM_SPLITS)
    start = split * blocks_per_split * BLOCK_SIZE
    end = tl.minimum(visible_end, start + blocks_per_split * BLOCK_SIZE)
    row_max = tl.full([BLOCK_Q * GROUP_P], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P, HEAD_DIM_P], tl.float32)
    for t0 in range(start, end, TILE_N):
        pos = t0 + tl.arange(0, TILE_N)
        pos_ok = pos < end
        phys = tl.load(block_tables_ptr + seq * table_stride + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        tail = phys
        if HAS_TAIL:
            tail = tl.load(tail_of_block + phys, mask=pos_ok, other=-1)
        k = _load_rows(k_codes, k_scale, k_zero, lut_ptr, tail_k_codes, tail_k_scale, tail_lut_ptr,
                       phys, offset, tail, kv_head, dims, pos_ok, dim_ok,
                       BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, BITS, K_MODE, ASYMMETRIC, HAS_TAIL)
        if DOT_F32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
        visible = (pos[None, :] <= query_pos[:, None]) & pos_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(row_max, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(row_max - m_safe)
        v = _load_rows(v_codes, v_scale, v_zero, lut_ptr, tail_v_codes, tail_v_scale, tail_lut_ptr,
                       phys, offset, tail, kv_head, dims, pos_ok, dim_ok,
                       BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, BITS, V_MODE, ASYMMETRIC, HAS_TAIL)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        row_max = m_new

    out_row = token * (NUM_KV_HEADS * GROUP) + head
    if NUM_SPLITS == 1:
        out = acc / tl.maximum(row_sum, 1e-30)[:, None]
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])
    else:
        partial = out_row * NUM_SPLITS + split
        tl.store(out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(max_ptr + partial, row_max, mask=row_ok)
        tl.store(sum_ptr + partial, row_sum, mask=row_ok)


def _fp8_max_code(fmt: KVFormat) -> int:
    return 126 if fmt.fp8 == torch.float8_e4m3fn else 123  # the largest finite code; above it NaN or inf


def store_kv(cache: KVCache, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Quantize key/value [T, kv_heads, head_dim] into their slots; a slot of -1 is skipped.

    Formats with a tail (int4_kivi) plan their writes on the host and keep the torch store of layers/kv_cache.py.
    """
    fmt = cache.format
    if fmt.needs_tail:
        cache.write(layer, slot_mapping, key, value)
        return
    code = 0 if not fmt.quantized else 3 if fmt.fp8 is not None else {8: 1, 4: 2}[fmt.bits]
    limit = torch.finfo(fmt.fp8).max if fmt.fp8 is not None else float(2 ** (fmt.bits - 1) - 1)
    if not key.shape[0]:
        return
    k, v = cache.layers[layer]
    _store_kernel[(key.shape[0],)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1), slot_mapping,
        k.codes, k.scale if k.scale is not None else k.codes, v.codes, v.scale if v.scale is not None else v.codes,
        cache.lut, HEADS_P=triton.next_power_of_2(cache.num_kv_heads), NUM_KV_HEADS=cache.num_kv_heads,
        HEAD_DIM=cache.head_dim, HALF_DIM_P=triton.next_power_of_2(cache.head_dim // 2), CODE=code, LIMIT=limit,
        FP8_MAX_CODE=_fp8_max_code(fmt) if fmt.fp8 is not None else 0)


def num_splits_for(num_seqs: int, num_kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Splits of a decode batch's contexts: enough programs to fill the GPU twice over, 8 blocks a split at least,
    16 splits at most (their partial sums are written and combined)."""
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(programs, num_seqs * num_kv_heads), max_blocks // 8, 16))


def paged_attention(q: torch.Tensor, cache: KVCache, layer: int, query_start: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, tile_seq: torch.Tensor,
                    tile_q0: torch.Tensor, block_q: int, scale: float, num_splits: int = 1) -> torch.Tensor:
    """Attention of q [T, heads, head_dim] over the paged context -> [T, heads, head_dim].

    Sequence i owns rows query_start[i]:query_start[i + 1] of q, the last tokens of its seq_lens[i] positions,
    read through block_tables[i]. Program tiles are (tile_seq[j], queries tile_q0[j] onwards, `block_q` of them).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // cache.num_kv_heads
    fmt = cache.format
    (k, v), tail = cache.layers[layer], cache.tail
    has_tail = bool(tail.layers)
    tail_k, tail_v = tail.layers[layer] if has_tail else (k, v)
    tokens = q.shape[0]
    if num_splits == 1:
        out = torch.empty_like(q)
        maxes = sums = out
    else:
        out = q.new_empty((tokens, num_heads, num_splits, head_dim), dtype=torch.float32)
        maxes = q.new_full((tokens, num_heads, num_splits), float("-inf"), dtype=torch.float32)
        sums = q.new_zeros((tokens, num_heads, num_splits), dtype=torch.float32)
    q = q if q.stride(2) == 1 else q.contiguous()

    def scales(plane):
        return plane.scale if plane.scale is not None else plane.codes

    def zeros(plane):
        return plane.zero if plane.zero is not None else scales(plane)

    _paged_attention_kernel[(tile_seq.shape[0], cache.num_kv_heads, num_splits)](
        out, maxes, sums, q, k.codes, scales(k), zeros(k), v.codes, scales(v), zeros(v), cache.lut,
        tail_k.codes, scales(tail_k), tail_v.codes, scales(tail_v), tail.lut,
        tail.of_block if has_tail else block_tables,
        block_tables, seq_lens, query_start, tile_seq, tile_q0,
        scale, block_tables.stride(0), q.stride(0), q.stride(1),
        GROUP=group, GROUP_P=triton.next_power_of_2(group), BLOCK_Q=block_q, HEAD_DIM=head_dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=cache.block_size,
        NUM_KV_HEADS=cache.num_kv_heads, TILE_N=max(16, min(64, triton.next_power_of_2(cache.block_size))),
        BITS=fmt.bits, K_MODE=MODES[fmt.key_scales], V_MODE=MODES[fmt.value_scales],
        ASYMMETRIC=fmt.asymmetric, HAS_TAIL=has_tail, NUM_SPLITS=num_splits,
        DOT_F32=q.dtype == torch.float32 or triton.knobs.runtime.interpret)
    if num_splits == 1:
        return out
    top = maxes.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    weight = torch.exp(maxes - top)
    combined = (out * weight.unsqueeze(-1)).sum(-2) / (weight * sums).sum(-1, keepdim=True).clamp_min(1e-30)
    return combined.to(q.dtype)


def block_q_for(num_heads: int, num_kv_heads: int, max_queries: int) -> int:
    """Query tokens per program: 16 rows at least (tl.dot's smallest tile on GPUs), 64 for prefill."""
    group_p = triton.next_power_of_2(num_heads // num_kv_heads)
    rows = 16 if max_queries == 1 else 64
    return max(1, rows // group_p)


def decode_tiles(num_seqs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_seq, tile_q0) of a decode-only batch: one tile per sequence, built on the device (no host copy)."""
    return torch.arange(num_seqs, device=device, dtype=torch.int32), torch.zeros(num_seqs, device=device,
                                                                                 dtype=torch.int32)


def prefill_tiles(num_queries: list[int], block_q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_seq, tile_q0) covering every query of sequences with `num_queries` new tokens each."""
    tile_seq, tile_q0 = [], []
    for seq, n in enumerate(num_queries):
        for q0 in range(0, n, block_q):
            tile_seq.append(seq)
            tile_q0.append(q0)
    return (torch.tensor(tile_seq, dtype=torch.int32, device=device),
            torch.tensor(tile_q0, dtype=torch.int32, device=device))

