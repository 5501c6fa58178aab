"""MemShare on a GPU, one command from the repository alone (torch, Triton and transformers; no weights, no vLLM):

    python bench/gpu.py [--out docs/bench/gpu]         # on a CUDA machine
    python bench/gpu.py --smoke --out /tmp/gpu-smoke   # on a CPU: Triton's interpreter, a tiny config

1. The Triton decode kernel's achieved bandwidth on the KV it reads, per KV dtype, against the GPU's nominal peak
   and against a device-to-device copy (what the memory system gives in practice).
2. Engine tok/s on the R1-Distill-Qwen-7B shape with dummy weights: dense against `random:share_ratio=R` under a
   KV budget where dense is KV-bound, so throughput depends only on the blocks freed; each run beside the
   bandwidth roofline at its own mean batch (weights plus the KV entries read per step, at the copy bandwidth).
3. MemShare's own cost on the device: stage 2 (block similarities of dequantized K/V) for a step's candidates,
   against the dense decode step. Stage 1 is bag-of-words over token ids on the host, independent of the GPU.

Writes gpu.json and gpu.png (when matplotlib is installed; `--plot gpu.json` draws it later elsewhere).
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the GPU machine has the repository only

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from memshare import LLM, SamplingParams, share_config  # noqa: E402
from memshare.layers import triton_attention  # noqa: E402
from memshare.layers.kv_cache import KVCache, block_bytes, kv_format  # noqa: E402
from memshare.models.loader import head_dim as config_head_dim  # noqa: E402
from memshare.models.weights import resolve_model  # noqa: E402
from memshare.sharing.stage2 import block_similarity  # noqa: E402

# Nominal HBM bandwidth, GB/s, from the vendors' data sheets.
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "L4": 300}


@dataclass(frozen=True, slots=True)
class Setup:
    model: str
    block_size: int
    kv_cache_dtypes: tuple[str, ...]
    kernel_batch: int
    kernel_context: int
    prompt_len: int
    max_tokens: int
    num_requests: int
    max_num_seqs: int
    dense_seqs: int  # full-length sequences the KV budget holds without sharing: well under max_num_seqs
    share_ratios: tuple[float, ...]
    stage2_blocks: tuple[int, int]  # (query blocks of a step, candidate blocks of earlier steps)
    iters: int


GPU = Setup("r1-distill-qwen-7b", 16, ("auto", "fp8", "int8_per_token_head", "int4_per_token_head", "int4_kivi"),
            kernel_batch=64, kernel_context=4096, prompt_len=128, max_tokens=2048, num_requests=96, max_num_seqs=128,
            dense_seqs=24, share_ratios=(0.2, 0.4, 0.6), stage2_blocks=(4, 64), iters=20)
SMOKE = Setup("tiny-qwen2", 4, ("auto", "int8_per_token_head", "int4_kivi"), kernel_batch=2, kernel_context=48,
              prompt_len=8, max_tokens=16, num_requests=3, max_num_seqs=3, dense_seqs=2, share_ratios=(0.4,),
              stage2_blocks=(2, 4), iters=1)


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call of fn, after a warm-up call."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) / iters


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (read plus write)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / timed(lambda: dst.copy_(src), 10, device) / 1e9


@cache
def kv_shape(model: str) -> tuple:
    hf = AutoConfig.from_pretrained(resolve_model(model)[0]).get_text_config()
    return hf, hf.num_attention_heads, hf.num_key_value_heads, config_head_dim(hf)


def weight_bytes(hf, dtype: torch.dtype) -> int:
    """Bytes a decode step reads of a Llama-family model's weights (the embedding row gather is negligible)."""
    q, kv = hf.num_attention_heads * config_head_dim(hf), hf.num_key_value_heads * config_head_dim(hf)
    layer = hf.hidden_size * (q + 2 * kv) + q * hf.hidden_size + 3 * hf.hidden_size * hf.intermediate_size
    return (hf.num_hidden_layers * layer + hf.vocab_size * hf.hidden_size) * dtype.itemsize


def kernel_bandwidth(setup: Setup, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The decode kernel over one layer of `kernel_batch` sequences of `kernel_context` tokens, per KV dtype."""
    return [kernel_row(setup, name, device, dtype) for name in tqdm(setup.kv_cache_dtypes, desc="decode kernel")]


def kernel_row(setup: Setup, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    _, num_heads, num_kv_heads, head_dim = kv_shape(setup.model)
    block_size, batch = setup.block_size, setup.kernel_batch
    blocks_per_seq = setup.kernel_context // block_size
    num_blocks = batch * blocks_per_seq
    fmt = kv_format(name, dtype, head_dim)
    cache = KVCache(fmt, 1, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    for chunk in torch.arange(num_blocks, device=device).split(1024):
        k, v = (torch.randn(len(chunk), block_size, num_kv_heads, head_dim, device=device) for _ in "kv")
        cache.store_blocks(0, chunk, k, v)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
    tables = torch.arange(num_blocks, device=device, dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), setup.kernel_context, device=device, dtype=torch.int32)
    query_start = torch.arange(batch + 1, device=device, dtype=torch.int32)
    tile_seq, tile_q0 = triton_attention.decode_tiles(batch, device)
    block_q = triton_attention.block_q_for(num_heads, num_kv_heads, 1)
    splits = triton_attention.num_splits_for(batch, num_kv_heads, blocks_per_seq, device)
    seconds = timed(lambda: triton_attention.paged_attention(
        q, cache, 0, query_start, seq_lens, tables, tile_seq, tile_q0, block_q, head_dim ** -0.5, splits),
        setup.iters, device)
    read = num_blocks * block_bytes(fmt, 1, block_size, num_kv_heads, head_dim)
    return {"kv_cache_dtype": name, "kv_bytes": read, "ms": seconds * 1e3, "gbps": read / seconds / 1e9,
            "num_splits": splits}


def engine_run(setup: Setup, share: str, ratio: float, kv_blocks: int, device: torch.device) -> dict:
    policy = share_config("none") if share == "none" else share_config("random", share_ratio=ratio, seed=0)
    llm = LLM(setup.model, load_format="dummy", skip_tokenizer_init=True, num_kv_blocks=kv_blocks,
              block_size=setup.block_size,
              max_num_seqs=setup.max_num_seqs, max_model_len=setup.prompt_len + setup.max_tokens, share=policy,
              device=device.type, attention_backend="triton", log_stats_interval=1e9)
    generator = torch.Generator().manual_seed(0)
    vocab = kv_shape(setup.model)[0].vocab_size
    prompts = torch.randint(0, vocab, (setup.num_requests, setup.prompt_len), generator=generator).tolist()
    params = SamplingParams(temperature=0, max_tokens=setup.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    begin = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - begin
    stats = llm.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    history = llm.kv_history()
    logical = sum(h[2] for h in history) / max(len(history), 1)  # table entries a step reads, shared ones twice
    row = {"policy": share if share == "none" else f"random:share_ratio={ratio}", "share_ratio": ratio,
           "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
           "mean_batch": stats["num_running_mean"], "mean_kv_entries": logical,
           "kv_block_bytes": stats["kv_block_bytes"], "preemptions": stats["num_preemptions"],
           "memory_saved_mean": stats.get("memory_saved_mean", 0.0),
           "sharing_time_share": stats.get("sharing_time_share", 0.0)}
    del llm, outputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def engine_throughput(setup: Setup, device: torch.device, dtype: torch.dtype, copy_gbps: float) -> list[dict]:
    hf, _, num_kv_heads, head_dim = kv_shape(setup.model)
    fmt = kv_format("auto", dtype, head_dim)
    blocks_per_seq = -(-(setup.prompt_len + setup.max_tokens) // setup.block_size)
    kv_blocks = setup.dense_seqs * blocks_per_seq
    runs = [engine_run(setup, "none", 0.0, kv_blocks, device)]
    runs += [engine_run(setup, "random", r, kv_blocks, device) for r in setup.share_ratios]
    weights = weight_bytes(hf, dtype)
    for row in runs:
        step_bytes = weights + row["mean_kv_entries"] * block_bytes(fmt, hf.num_hidden_layers, setup.block_size,
                                                                    num_kv_heads, head_dim)
        row["roofline_tok_s"] = row["mean_batch"] * copy_gbps * 1e9 / step_bytes
        row["of_roofline"] = row["tok_s"] / row["roofline_tok_s"]
        row["vs_dense"] = row["tok_s"] / runs[0]["tok_s"]
    return runs


def stage2_cost(setup: Setup, device: torch.device, dtype: torch.dtype, dense_step_s: float) -> dict:
    """Stage 2 for one step pair: m query blocks against n candidates, every layer, as the policy computes it."""
    hf, _, num_kv_heads, head_dim = kv_shape(setup.model)
    m, n = setup.stage2_blocks
    shape = (hf.num_hidden_layers, setup.block_size, num_kv_heads, head_dim)
    query = [torch.randn(shape[0], m, *shape[1:], device=device, dtype=dtype) for _ in "kv"]
    candidates = [torch.randn(shape[0], n, *shape[1:], device=device, dtype=dtype) for _ in "kv"]
    seconds = timed(lambda: block_similarity(*query, *candidates), setup.iters, device)
    return {"query_blocks": m, "candidate_blocks": n, "ms": seconds * 1e3,
            "of_dense_decode_step": seconds / dense_step_s if dense_step_s else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    kernel = result["kernel"]
    left.bar([r["kv_cache_dtype"] for r in kernel], [r["gbps"] for r in kernel], color="tab:blue")
    for value, label, style in ((result["peak_gbps"], "nominal peak", "--"),
                                (result["copy_gbps"], "device copy", ":")):
        if value:
            left.axhline(value, color="black", linestyle=style, label=f"{label} {value:.0f} GB/s")
    left.set_ylabel("GB/s of KV read")
    left.set_title(f"decode attention, batch {result['setup']['kernel_batch']}, "
                   f"context {result['setup']['kernel_context']}")
    left.legend()
    engine = result["engine"]
    ratios = [r["share_ratio"] for r in engine]
    right.plot(ratios, [r["tok_s"] for r in engine], "o-", label="memshare engine")
    right.plot(ratios, [r["roofline_tok_s"] for r in engine], "s--", color="gray", label="bandwidth roofline")
    right.set_xlabel("share ratio R (random sharing; 0 = dense)")
    right.set_ylabel("output tok/s")
    right.set_title(f"{result['setup']['model']}, dummy weights, KV-bound")
    right.legend()
    smoke = " · smoke run: Triton's interpreter on a CPU, no meaning as speed" if result["smoke"] else ""
    fig.suptitle(f"{result['device']} · {result['date']}{smoke}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/gpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on CPU under Triton's interpreter")
    parser.add_argument("--plot", metavar="GPU_JSON", help="only draw gpu.png from an earlier gpu.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), out / "gpu.png")
        return {}
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke on a CPU")
    setup = SMOKE if args.smoke else GPU
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    copy_gbps = copy_bandwidth(device)
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "setup": asdict(setup), "dtype": str(dtype),
              "peak_gbps": next((v for k, v in PEAK_GBPS.items() if k in name), None), "copy_gbps": copy_gbps,
              "torch": torch.__version__, "smoke": args.smoke}
    result["kernel"] = kernel_bandwidth(setup, device, dtype)
    result["engine"] = engine_throughput(setup, device, dtype, copy_gbps)
    dense = result["engine"][0]
    dense_step = dense["mean_batch"] / dense["tok_s"] if dense["tok_s"] else 0.0
    result["stage2"] = stage2_cost(setup, device, dtype, dense_step)
    for row in result["kernel"]:
        row["of_peak"] = row["gbps"] / result["peak_gbps"] if result["peak_gbps"] else None
        row["of_copy"] = row["gbps"] / copy_gbps
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    try:
        plot(result, out / "gpu.png")
    except ImportError:
        print("matplotlib is not installed: wrote gpu.json only; draw it with --plot gpu.json")
    for row in result["kernel"]:
        print(f"kernel {row['kv_cache_dtype']:>20}: {row['gbps']:8.1f} GB/s  ({row['ms']:.3f} ms)")
    for row in result["engine"]:
        print(f"engine {row['policy']:>24}: {row['tok_s']:8.1f} tok/s  {row['vs_dense']:.2f}x dense  "
              f"{row['of_roofline']:.2f} of roofline  batch {row['mean_batch']:.1f}")
    print(f"stage 2: {result['stage2']['ms']:.3f} ms for {result['stage2']['query_blocks']} x "
          f"{result['stage2']['candidate_blocks']} blocks")
    return result


if __name__ == "__main__":
    main()
