"""Quantized KV cache (`kv_cache_dtype`): round-trip error of each format against its arithmetic, the bytes of a
block and the blocks a budget buys, greedy parity with float32 KV, block-pool and tail-pool invariants under
sharing, eviction, preemption and prefix caching, zero-copy sharing of quantized blocks, and bad values."""

import pytest
import torch

from memshare import LLM, EngineConfig, SamplingParams, share_config
from memshare.config import KV_CACHE_DTYPES, parse_memory
from memshare.engine.llm_engine import LLMEngine
from memshare.errors import KVCacheDtypeError, MemShareError
from memshare.layers.kv_cache import FORMATS, KVCache, block_bytes, dequantize, kv_format, quantize

from .conftest import MODEL
from .test_policies import check_ref_counts

LAYERS, BLOCK, HEADS, DIM = 30, 16, 3, 64  # smollm2-135m's KV: 30 layers, 3 KV heads of 64
F16 = 2.0**-11  # relative rounding of a float16 scale or zero point
BUDGET = "64MiB"


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# --- round trip ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    """float64 [8 blocks, 16 tokens, 3 heads, 64 dims], normal, each channel scaled by e^N(0,1) (outlier channels)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, BLOCK, HEADS, DIM, generator=gen, dtype=torch.float64)
    return x * torch.randn(DIM, generator=gen, dtype=torch.float64).exp()


def round_trip(name: str, x: torch.Tensor, mode: str):
    fmt = FORMATS[name]
    codes, scale, zero = quantize(fmt, x, mode)
    return codes, scale, zero, dequantize(fmt, fmt.lut(x.device), codes, scale, zero, mode, torch.float64)


# Per-value bounds |x' - x| <= rel * |x| + sub * scale: round to nearest keeps half an ulp of the significand
# (float32 24 bits, bfloat16 8, e4m3 4, e5m2 3); below the normal range (fp8 subnormals) half the subnormal step
# (e4m3 2^-9, e5m2 2^-16) of the stored scale.
ELEMENTWISE = {"float32": (2.0**-24, 0.0), "bfloat16": (2.0**-8, 0.0), "fp8_e4m3": (2.0**-4, 2.0**-10),
               "fp8_e5m2": (2.0**-3, 2.0**-17)}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_formats_round_trip_within_half_an_ulp(name, blocks):
    """Measured max |x' - x| / |x| (seed 0): float32 5.9e-8, bfloat16 3.9e-3, e4m3 5.9e-2 (normals; subnormals
    9.1e-4 of the scale), e5m2 1.1e-1."""
    rel, sub = ELEMENTWISE[name]
    codes, scale, zero, back = round_trip(name, blocks, "token")
    assert codes.dtype == FORMATS[name].storage and codes.shape == blocks.shape and zero is None
    if FORMATS[name].fp8 is None:
        assert scale is None
        scale = torch.zeros(())
    else:
        assert scale.dtype == torch.float16 and scale.shape == blocks.shape[:-1]  # one per token and head
        scale = scale.double().unsqueeze(-1)
    # 2^-22: float32 arithmetic on the way (x in float32, x / scale)
    bound = rel * (1 + 2.0**-22) * blocks.abs() + sub * scale
    error = (back - blocks).abs()
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max().item():.4f}"
    assert (error / bound).max() > 0.5  # the grid really is that coarse (a finer one would mean another format)


# Per-row bounds on max |x' - x| over a quantization group (a token-head row of 64, or a key channel over a
# block's 16 tokens): symmetric b-bit, half a step of absmax / (2^(b-1) - 1), the float16 scale rounded up by up
# to 2^-11; asymmetric int4, half a step of range / 15 plus what the float16 zero point moves the grid (<= 2^-11 of
# |min|, and 2^-11 of the range saturated at the top); 2^-20: float32 arithmetic.
GROUPED = [("int8_per_token_head", "token", 127), ("int4_per_token_head", "token", 7),
           ("int4_kivi", "channel", 15), ("int4_kivi", "token", 15)]


@pytest.mark.parametrize("name, mode, levels", GROUPED)
def test_integer_formats_round_trip_within_half_a_step(name, mode, levels, blocks):
    """Measured max error over the group's absmax (symmetric) or range (KIVI) (seed 0): int8 3.93705e-3 (0.5/127 =
    3.93701e-3: the float16 scale rounds), int4 7.14291e-2 (0.5/7 = 7.14286e-2), KIVI keys per channel 3.3332e-2,
    values per token 3.3339e-2 (0.5/15 = 3.3333e-2)."""
    fmt = FORMATS[name]
    codes, scale, zero, back = round_trip(name, blocks, mode)
    reduce = -3 if mode == "channel" else -1
    assert codes.dtype == torch.uint8 and codes.shape[-1] == DIM * fmt.bits // 8  # int4: two codes per byte
    groups = (*blocks.shape[:-3], HEADS, DIM) if mode == "channel" else blocks.shape[:-1]
    assert scale.shape == groups and scale.dtype == torch.float16
    error = (back - blocks).abs().amax(reduce)
    if fmt.asymmetric:
        assert zero.shape == groups
        low, high = blocks.amin(reduce), blocks.amax(reduce)
        size = high - low
        bound = 0.5 / levels * (1 + F16) * size + F16 * (low.abs() + size) + 2.0**-20 * size
    else:
        assert zero is None
        size = blocks.abs().amax(reduce)
        bound = 0.5 / levels * (1 + F16) * size + 2.0**-20 * size
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max().item():.6f}"
    assert (error / size).max() > 0.9 * 0.5 / levels  # and not finer


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_small_and_zero_rows_round_trip(name, blocks):
    rows = blocks[0, :3].clone()  # 3 tokens of 3 heads
    rows[0] = 0.0  # an all-zero token
    rows[1] *= 1e-3 / rows[1].abs().amax()  # absmax 1e-3: the e5m2 scale 1e-3 / 57344 is below float16's 6e-8
    rows[2] *= 1e-6 / rows[2].abs().amax()  # absmax 1e-6: the e4m3 scale 1e-6 / 448 too
    back = round_trip(name, rows, "token")[3]
    assert not back.isnan().any()
    # no worse, relative to each token-head row's absmax, than the format's precision
    assert ((back - rows).abs().amax(-1) <= ELEMENTWISE[name][0] * rows.abs().amax(-1)).all()


@pytest.mark.parametrize("name", ["int8_per_token_head", "fp8_e4m3", "int4_per_token_head", "int4_kivi"])
def test_cache_write_and_gather_through_slots(name):
    """Tokens written through a slot mapping over two steps read back as their quantized values. KIVI: the partial
    newest block sits in the 8-bit tail (int8 per token and head) until it fills, then the block (its tail's values
    and the new tokens) is quantized with per-channel key scales, and the tail slot is freed."""
    fmt, tail_fmt = FORMATS[name], "int8_per_token_head"
    cache = KVCache(fmt, 1, 6, BLOCK, HEADS, DIM, torch.float32, torch.device("cpu"), num_tail_blocks=2)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 40, HEADS, DIM, generator=gen).unbind(0)
    table = [4, 1, 3]  # tokens 0-15, 16-31, 32-39
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(40)]

    def per_token(format_name: str, x: torch.Tensor) -> torch.Tensor:
        return round_trip(format_name, x.unsqueeze(0), "token")[3].float()[0]

    # What each token's block was quantized from: the tokens, or for KIVI what the tail held of the earlier ones.
    source = {"k": k.clone(), "v": v.clone()}
    for start, end in ((0, 25), (25, 40)):  # a prefill ending inside block 1, then the rest
        cache.begin_step(slots[start:end])
        cache.write(0, torch.tensor(slots[start:end]), k[start:end], v[start:end])
        got = dict(zip("kv", cache.gather(0, torch.tensor(table[: -(-end // BLOCK)]))))
        full = end // BLOCK * BLOCK
        assert set(cache.tail.slots) == ({table[full // BLOCK]} if fmt.needs_tail else set())  # the partial block
        for which, mode in (("k", fmt.key_scales), ("v", fmt.value_scales)):
            full_blocks = source[which][:full].view(-1, BLOCK, HEADS, DIM)
            expected = round_trip(name, full_blocks, mode)[3].float().view(full, HEADS, DIM)
            torch.testing.assert_close(got[which][:full], expected, rtol=0, atol=0)
            x = (k if which == "k" else v)[full:end]
            partial = per_token(tail_fmt if fmt.needs_tail else name, x)
            torch.testing.assert_close(got[which][full:end], partial, rtol=0, atol=0)
            source[which][full:end] = partial if fmt.needs_tail else x
    read_k, _ = cache.read([table[0], table[2]])
    assert read_k.shape == (1, 2, BLOCK, HEADS, DIM)
    torch.testing.assert_close(read_k[0, :, :8].flatten(0, 1), torch.cat([got["k"][:8], got["k"][32:40]]))
    cache.release(table[2])
    assert cache.tail.slots == {} and sorted(cache.tail.free) == list(range(2 if fmt.needs_tail else 0))


def test_kivi_tail_keeps_decoded_tokens_without_drift():
    """Decode writes one token a step into a partial block; each step the 8-bit tail is dequantized, the token added
    and the tail requantized. The earlier tokens must read back bit-identically every step (no drift), within
    int8's half step of their row's absmax."""
    cache = KVCache(FORMATS["int4_kivi"], 1, 2, BLOCK, HEADS, DIM, torch.float32, torch.device("cpu"),
                    num_tail_blocks=1)
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, BLOCK - 1, HEADS, DIM, generator=gen, dtype=torch.float64).unbind(0)
    seen: list[torch.Tensor] = []
    for t in range(BLOCK - 1):
        cache.begin_step([BLOCK + t])
        cache.write(0, torch.tensor([BLOCK + t]), k[t : t + 1].float(), v[t : t + 1].float())
        got_k, got_v = cache.gather(0, torch.tensor([1]))
        seen.append(torch.stack([got_k[t], got_v[t]]))
        assert torch.equal(torch.stack([got_k[: t + 1], got_v[: t + 1]], 1), torch.stack(seen))
    for got, x in ((got_k, k), (got_v, v)):
        error = (got[: BLOCK - 1].double() - x).abs().amax(-1)
        assert (error <= 0.5 / 127 * (1 + F16) * x.abs().amax(-1) * (1 + 2.0**-20)).all()
    assert set(cache.tail.slots) == {1}


def test_kivi_budget_runs_a_sequence_in_every_block():
    kivi, tail = (block_bytes(FORMATS[n], LAYERS, BLOCK, HEADS, DIM) for n in ("int4_kivi", "int8_per_token_head"))
    # two blocks with their tails, and a remainder that buys two more blocks (but no tail): 4 blocks, 2 tail slots
    llm = LLM(model=MODEL, kv_cache_memory=2 * (kivi + tail) + 2 * kivi, kv_cache_dtype="int4_kivi", max_num_seqs=4,
              log_stats_interval=0)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = llm.generate(["Hi.", "Hello.", "Hey there.", "Yo."], params, use_tqdm=False)  # a block each
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4] * 4


# --- bytes and block counts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(LAYERS, BLOCK, HEADS, DIM), (2, 32, 8, 128)])
def test_block_bytes_are_codes_plus_scales(shape):
    layers, block_size, heads, dim = shape
    size = {name: block_bytes(fmt, *shape) for name, fmt in FORMATS.items()}
    assert size["bfloat16"] == layers * 2 * block_size * heads * dim * 2 and size["float32"] == 2 * size["bfloat16"]
    per_token = layers * 2 * block_size * heads * 2  # K and V: one float16 scale per token and head
    for name in ("fp8_e4m3", "fp8_e5m2", "int8_per_token_head"):
        assert size[name] == size["bfloat16"] // 2 + per_token
    assert size["int4_per_token_head"] == size["bfloat16"] // 4 + per_token
    # KIVI: keys a scale and a zero point per channel and head, values per token and head
    assert size["int4_kivi"] == size["bfloat16"] // 4 + layers * 2 * 2 * (heads * dim + block_size * heads)


def tail_planes(cache: KVCache) -> list:
    return [p for layer in cache.tail.layers for p in layer]


def stored_bytes(planes: list) -> int:
    return sum(t.numel() * t.element_size() for p in planes for t in (p.codes, p.scale, p.zero) if t is not None)


@pytest.fixture(scope="module")
def budget_runs(prompts):
    """Per kv_cache_dtype, an engine with kv_cache_memory=64MiB: its block count and bytes, and for auto, int8
    and fp8 the greedy tokens of the 8 prompts, 64 tokens each. Engines are dropped once measured."""
    runs: dict[str, dict] = {}

    def run(kv_cache_dtype: str) -> dict:
        if kv_cache_dtype not in runs:
            llm = LLM(model=MODEL, kv_cache_memory=BUDGET, kv_cache_dtype=kv_cache_dtype, log_stats_interval=0)
            runner = llm.llm_engine.model_runner
            cache = runner.kv_cache
            planes = [p for layer in cache.layers for p in layer]
            runs[kv_cache_dtype] = {
                "format": runner.kv_format, "blocks": runner.num_kv_blocks, "block_bytes": runner.block_bytes,
                "tail_block_bytes": cache.tail_block_bytes, "max_num_seqs": llm.llm_engine.config.max_num_seqs,
                "stored_bytes": stored_bytes(planes), "tail_bytes": stored_bytes(tail_planes(cache)),
                "codes": planes[0].codes.dtype}
            if kv_cache_dtype in ("auto", "int8_per_token_head", "fp8"):
                params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
                outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                runs[kv_cache_dtype]["tokens"] = token_ids(outputs)
        return runs[kv_cache_dtype]

    return run


def test_block_count_follows_block_bytes(budget_runs):
    budget = parse_memory(BUDGET)
    dense, bf16, fp8, kivi = (budget_runs(d) for d in ("auto", "bfloat16", "fp8", "int4_kivi"))
    assert dense["format"].name == "float32" and fp8["format"].name == "fp8_e4m3" and fp8["codes"] == torch.uint8
    for run in (dense, bf16, fp8, kivi):
        assert run["block_bytes"] == block_bytes(run["format"], LAYERS, BLOCK, HEADS, DIM)
        assert run["stored_bytes"] == run["blocks"] * run["block_bytes"]  # what is allocated is what was counted
    for run in (dense, bf16, fp8):
        assert run["tail_bytes"] == 0 and run["blocks"] == budget // run["block_bytes"]
    # fp8: half of bfloat16's bytes plus a float16 scale per token and head, so 1.94x the blocks (353 vs 182)
    assert fp8["blocks"] / bf16["blocks"] == pytest.approx(bf16["block_bytes"] / fp8["block_bytes"], rel=0.01)
    assert 1.9 < fp8["blocks"] / bf16["blocks"] < 2
    # int4_kivi: an 8-bit tail block for every sequence that can run comes off the budget first (454 blocks, not
    # the 554 of the whole budget)
    assert kivi["tail_block_bytes"] == block_bytes(FORMATS["int8_per_token_head"], LAYERS, BLOCK, HEADS, DIM)
    assert kivi["tail_bytes"] == kivi["max_num_seqs"] * kivi["tail_block_bytes"] > 0
    assert kivi["blocks"] == (budget - kivi["tail_bytes"]) // kivi["block_bytes"]
    assert kivi["stored_bytes"] + kivi["tail_bytes"] <= budget


# --- greedy parity with float32 KV -----------------------------------------------------------------------------

def agreement(dtype: str, budget_runs) -> list[int]:
    """Per prompt, how many leading greedy tokens equal float32 KV's (64: all)."""
    reference, tokens = budget_runs("auto")["tokens"], budget_runs(dtype)["tokens"]
    return [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(reference, tokens)]


def test_int8_kv_greedy_tokens_follow_float32_kv(budget_runs):
    """Measured (smollm2-135m, CPU, panel linear kernel): leading tokens equal to float32 KV's per prompt
    [64, 64, 64, 64, 52, 34, 10, 0] of 64 (the last prompt's first token is a near-tie; before the panel kernel's
    summation order it held for 17). Claimed: the first 8 on 7 of the 8 prompts, all 64 on at least 4."""
    agree = agreement("int8_per_token_head", budget_runs)
    assert sum(n >= 8 for n in agree) >= 7 and sum(n == 64 for n in agree) >= 4, agree


def test_fp8_kv_greedy_tokens_follow_float32_kv(budget_runs):
    """Measured: [40, 64, 21, 12, 52, 64, 10, 1] of 64 (e4m3 keeps 4 significant bits to int8's ~7). Claimed: the
    first token on every prompt, the first 8 on 7 of the 8, all 64 on at least one; int8 agrees for longer."""
    agree = agreement("fp8", budget_runs)
    assert min(agree) >= 1 and sum(n >= 8 for n in agree) >= 7 and 64 in agree, agree
    assert sum(agreement("int8_per_token_head", budget_runs)) > sum(agree)


# --- block-pool invariants -------------------------------------------------------------------------------------

def check_pool(engine: LLMEngine) -> int:
    """Ref counts equal block-table entries; exactly the blocks with ref_cnt 0 are free; waiting sequences hold
    nothing; the tail pool holds exactly the partial last block of each running sequence (none for formats
    without one) and its free list the rest. Returns the number of tail slots in use."""
    check_ref_counts(engine)
    bm, scheduler = engine.block_manager, engine.scheduler
    assert all((block.block_id in bm.free_queue) == (block.ref_cnt == 0) for block in bm.blocks)
    assert all(not seq.block_table for seq in scheduler.waiting)
    cache = engine.model_runner.kv_cache
    tail = cache.tail
    partial = {seq.block_table[(n - 1) // bm.block_size] for seq in scheduler.running
               if (n := seq.num_cached_kv_tokens) % bm.block_size}
    assert set(tail.slots) == (partial if cache.format.needs_tail else set())
    assert {b: t for b, t in enumerate(tail.of_block.tolist()) if t >= 0} == tail.slots
    capacity = len(tail.layers[0][0].codes) if tail.layers else 0
    assert sorted([*tail.free, *tail.slots.values()]) == list(range(capacity))
    return len(tail.slots)


def check_zero_copy_shares(engine: LLMEngine) -> list[int]:
    """Wrap `share`: it must point both entries at the source's physical block, leave the stored codes, scales and
    zero points of every block still referenced (and every tail) untouched, and both entries must read back
    (dequantized) as the source did before. Returns the blocks shared."""
    bm, cache = engine.block_manager, engine.model_runner.kv_cache
    share, log = bm.share, []

    def stored(blocks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        planes = [p for layer in cache.layers for p in layer]
        return ([t[blocks] for p in planes for t in (p.codes, p.scale, p.zero) if t is not None],
                [t.clone() for p in tail_planes(cache) for t in (p.codes, p.scale)])

    def checked_share(seq, index, source_index):
        live = [block.block_id for block in bm.blocks if block.ref_cnt]
        (blocks, tails), (source_k, source_v) = stored(live), bm.read_kv([seq.block_table[source_index]])
        target = share(seq, index, source_index)
        assert seq.block_table[index] == seq.block_table[source_index] == target
        kept = [i for i, b in enumerate(live) if bm.blocks[b].ref_cnt]  # all but a released duplicate
        assert len(kept) >= len(live) - 1
        blocks_after, tails_after = stored(live)
        assert all(torch.equal(a[kept], b[kept]) for a, b in zip(blocks, blocks_after))
        assert all(torch.equal(a, b) for a, b in zip(tails, tails_after))
        k, v = bm.read_kv([seq.block_table[index], seq.block_table[source_index]])
        assert torch.equal(k[:, :1], source_k) and torch.equal(k[:, 1:], source_k)
        assert torch.equal(v[:, :1], source_v) and torch.equal(v[:, 1:], source_v)
        log.append(target)
        return target

    bm.share = checked_share
    return log


# Each run: 8 requests (4 prompts twice: the copies hit the prefix cache) in a pool too small for them (preemption).
POOL_RUNS = {"random-share": ({"policy": "random", "share_ratio": 0.5}, 20, 48),
             "h2o": ({"policy": "h2o", "kv_budget": 1}, 16, 40)}


@pytest.mark.parametrize("run", list(POOL_RUNS))
@pytest.mark.parametrize("kv_cache_dtype", ["int4_kivi", "int8_per_token_head"])
def test_pool_invariants_under_sharing_eviction_preemption_and_prefix_hits(kv_cache_dtype, run, prompts):
    share, num_kv_blocks, max_tokens = POOL_RUNS[run]
    engine = LLMEngine(EngineConfig(model=MODEL, num_kv_blocks=num_kv_blocks, max_num_seqs=8, log_stats_interval=0,
                                    kv_cache_dtype=kv_cache_dtype, share=share_config(**share)))
    shares = check_zero_copy_shares(engine)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts[:4] * 2):
        engine.add_request(str(i), ids, params)
    most_tails = 0
    while engine.has_unfinished_requests():
        engine.step()
        most_tails = max(most_tails, check_pool(engine))
    stats = engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0 and stats["finished_requests"] == 8
    if run == "random-share":
        assert stats["blocks_shared"] == len(shares) > 0
    else:
        assert stats["blocks_evicted"] > 0
    assert most_tails >= (2 if kv_cache_dtype == "int4_kivi" else 0)
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and all(block.ref_cnt == 0 for block in bm.blocks) and not engine.policy.states
    assert check_pool(engine) == 0  # no tail left behind


@pytest.mark.parametrize("kv_cache_dtype", ["int4_kivi", "int8_per_token_head"])
def test_prefix_cache_hits_on_quantized_blocks_keep_greedy_tokens(kv_cache_dtype, prompts):
    """The same batch twice with prefix caching (the second time every full prompt block hits, the first time the
    shared chat-template blocks) gives the tokens of an engine without prefix caching."""
    batch = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    cached = LLM(model=MODEL, num_kv_blocks=64, kv_cache_dtype=kv_cache_dtype, log_stats_interval=0)
    first = token_ids(cached.generate(batch, params, use_tqdm=False))
    bm = cached.llm_engine.block_manager
    hits = bm.prefix_hits
    again = token_ids(cached.generate(batch, params, use_tqdm=False))
    assert bm.prefix_hits - hits == sum((len(p) - 1) // BLOCK * BLOCK for p in prompts)
    uncached = LLM(model=MODEL, num_kv_blocks=64, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
                   log_stats_interval=0)
    assert token_ids(uncached.generate(batch, params, use_tqdm=False)) == first == again
    assert uncached.stats()["prefix_cache_hits"] == 0
    for llm in (cached, uncached):
        assert llm.stats()["kv_blocks_used"] == 0 and not llm.llm_engine.model_runner.kv_cache.tail.slots


# --- bad values ------------------------------------------------------------------------------------------------

def test_bad_kv_cache_dtypes_raise_typed_errors():
    assert issubclass(KVCacheDtypeError, MemShareError) and issubclass(KVCacheDtypeError, ValueError)
    with pytest.raises(KVCacheDtypeError, match="'fp4'") as info:
        EngineConfig(kv_cache_dtype="fp4")
    assert all(repr(name) in str(info.value) for name in KV_CACHE_DTYPES)  # names every allowed value
    for name in ("int4_kivi", "int4_per_token_head"):
        with pytest.raises(KVCacheDtypeError, match="packs two values per byte; head_dim 63 is odd"):
            kv_format(name, torch.float32, head_dim=63)
        assert kv_format(name, torch.float32, head_dim=64) is FORMATS[name]
    assert kv_format("int8_per_token_head", torch.float32, head_dim=63) is FORMATS["int8_per_token_head"]
    with pytest.raises(KVCacheDtypeError, match="model dtype"):
        kv_format("auto", torch.float16)
    assert kv_format("auto", torch.bfloat16) is FORMATS["bfloat16"] and kv_format("fp8", torch.float32).fp8 is not None
