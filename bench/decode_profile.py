"""Where a batched decode step's time goes, against this CPU's measured float32 roofline.

    python -m bench.decode_profile [--model smollm2-135m] [--batch 32] [--context 245] [--out docs/bench/profile]
        [--kv-cache-dtype auto,fp8,int8_per_token_head,int4_kivi]

Measures the roofline first (float32 GEMM of 2048^3 and a streaming read of 512 MB), then runs `--batch` greedy
requests whose prompts are `--context` tokens of MATH-500 text, and profiles decode steps (engine.step, the
public call) with torch.profiler: each linear layer shape with its GFLOP/s, the paged-attention kernel, other
torch ops, and the remainder (Python, scheduling). Also states the GEMM floor of bench/throughput.py's workload:
its linear-layer FLOPs over the measured roofline. Writes {model}-{model_impl}.json and prints a Markdown table.
With several KV dtypes, the same decode step (same batch, same context) is measured for each, and a table gives
the step and the attention kernel against the first dtype's.
"""

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from bench.peers import MAX_NEW_TOKENS, THREADS, math500_prompts
from memshare import SamplingParams
from memshare.config import EngineConfig
from memshare.engine.llm_engine import LLMEngine
from memshare.models.loader import head_dim
from memshare.models.weights import resolve_model

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "profile"
GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")
PANEL_LINEAR = "memshare::panel_linear "  # layers/linear.py names its kernel calls "... MxK @ NxK" under a profiler


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def roofline() -> dict[str, float]:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = torch.randn(128 * 2**20)
    return {"sgemm_gflops": 2 * 2048**3 / best_of(lambda: a @ b) / 1e9,
            "read_gb_per_s": big.numel() * 4 / best_of(big.sum) / 1e9}


def decode_prompts(engine: LLMEngine, batch: int, context: int) -> list[list[int]]:
    text = [t for p in math500_prompts(engine.tokenizer, batch * 4) for t in p]
    return [text[i * context : (i + 1) * context] for i in range(batch)]


def profile_steps(engine: LLMEngine, steps: int) -> tuple[float, dict[str, tuple[float, int]], dict[str, float]]:
    """(wall ms per step, (GEMM ms, calls) per step by shape, other op ms per step by name) over `steps` steps."""
    gemm: dict[str, tuple[float, int]] = {}
    other: dict[str, float] = defaultdict(float)
    with torch.profiler.profile(record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps * 1e3
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3 / steps
        if event.key in GEMM_OPS or event.key.startswith(PANEL_LINEAR):
            rows, cols = (event.input_shapes[0], event.input_shapes[1]) if event.key in GEMM_OPS else \
                [tuple(map(int, part.split("x"))) for part in event.key.removeprefix(PANEL_LINEAR).split(" @ ")]
            shape = f"{rows[-2] if len(rows) > 1 else 1}x{rows[-1]} @ {cols[0]}x{cols[1]}"
            ms_before, calls_before = gemm.get(shape, (0.0, 0))
            gemm[shape] = (ms_before + ms, calls_before + event.count // steps)
        else:
            other[event.key] += ms
    return wall, dict(gemm), dict(other)


def workload_floor(model: str, gemm_gflops: float, num_prompts: int = 32) -> dict[str, float]:
    """The throughput workload's (bench/throughput.py) linear-layer FLOPs and the tok/s they allow at the GEMM
    roofline with nothing else taking time: no engine on this CPU in float32 can beat it."""
    config = AutoConfig.from_pretrained(resolve_model(model)[0]).get_text_config()
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    hidden = config.hidden_size
    layer_params = config.num_hidden_layers * (hidden * (2 * q + 2 * kv) + 3 * hidden * config.intermediate_size)
    head_params = config.vocab_size * hidden
    prompt_tokens = sum(map(len, math500_prompts(AutoTokenizer.from_pretrained(resolve_model(model)[0]), num_prompts)))
    decode_tokens = num_prompts * (MAX_NEW_TOKENS - 1)  # each first output token comes out of the prefill
    gflop = 2 * ((prompt_tokens + decode_tokens) * layer_params + (num_prompts + decode_tokens) * head_params) / 1e9
    seconds = gflop / gemm_gflops
    return {"prompt_tokens": prompt_tokens, "gflop": gflop, "seconds": seconds,
            "max_tokens_per_s": num_prompts * MAX_NEW_TOKENS / seconds}


def gflops(shape: str, ms: float, calls: int) -> float:
    (m, k), (n, _) = (tuple(map(int, part.split("x"))) for part in shape.split(" @ "))
    return 2 * m * n * k * calls / (ms / 1e3) / 1e9 if ms else 0.0


def decode_step(args: argparse.Namespace, kv_cache_dtype: str) -> tuple[int, float, float, dict, dict]:
    """(KV block bytes, prefill seconds, then profile_steps' figures) for `--batch` requests decoding at
    `--context`; the engine is dropped, so one KV cache is held at a time."""
    engine = LLMEngine(EngineConfig(model=args.model, kv_cache_memory="1GiB", num_threads=THREADS,
                                    max_num_seqs=args.batch, model_impl=args.model_impl, log_stats_interval=0,
                                    kv_cache_dtype=kv_cache_dtype))
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    for i, prompt in enumerate(decode_prompts(engine, args.batch, args.context)):
        engine.add_request(str(i), prompt, params)
    prefill_steps = -(-args.batch * args.context // engine.config.max_num_batched_tokens)
    start = time.perf_counter()
    for _ in tqdm(range(prefill_steps), desc=f"prefill ({kv_cache_dtype})"):
        engine.step()
    prefill_s = time.perf_counter() - start
    for _ in range(3):  # warm-up decode steps
        engine.step()
    return engine.model_runner.block_bytes, prefill_s, *profile_steps(engine, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=245)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model-impl", default="auto")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--kv-cache-dtype", default="auto", help="comma-separated KV dtypes, each profiled")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    roof = roofline()
    dtypes = args.kv_cache_dtype.split(",")
    steps = {dtype: decode_step(args, dtype) for dtype in dtypes}
    by_dtype = {dtype: {"step_ms": step[2], "attention_ms": step[4].get("memshare::paged_decode", 0.0),
                        "kv_block_bytes": step[0]} for dtype, step in steps.items()}
    _, prefill_s, wall, gemm, other = steps[dtypes[0]]
    attention = other.pop("memshare::paged_decode", 0.0)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores", "model": args.model, "model_impl": args.model_impl, "batch": args.batch,
        "context": args.context, "kv_cache_dtype": dtypes[0], "roofline": roof,
        "prefill_tokens_per_s": args.batch * args.context / prefill_s,
        "step_ms": wall, "attention_ms": attention,
        "gemm_ms": {shape: {"ms": ms, "calls": calls, "gflops": gflops(shape, ms, calls)}
                    for shape, (ms, calls) in sorted(gemm.items())},
        "other_ops_ms": sum(other.values()),
        "top_other_ops_ms": dict(sorted(other.items(), key=lambda kv: -kv[1])[:8]),
        "by_kv_cache_dtype": by_dtype,
    }
    report["rest_ms"] = wall - sum(ms for ms, _ in gemm.values()) - attention - report["other_ops_ms"]
    report["workload_gemm_floor"] = floor = workload_floor(args.model, roof["sgemm_gflops"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}-{args.model_impl}.json").write_text(json.dumps(report, indent=1))
    print(f"roofline: float32 GEMM {roof['sgemm_gflops']:.0f} GFLOP/s, read {roof['read_gb_per_s']:.1f} GB/s; "
          f"prefill {report['prefill_tokens_per_s']:.0f} tokens/s")
    print(f"throughput workload: {floor['gflop']:.0f} GFLOP of linear layers = {floor['seconds']:.1f} s at the GEMM "
          f"roofline, at most {floor['max_tokens_per_s']:.0f} output tok/s")
    print(f"| part | ms / step |\n|---|---|\n| whole step (wall) | {wall:.1f} |")
    for shape, (ms, calls) in sorted(gemm.items(), key=lambda kv: -kv[1][0]):
        print(f"| linear {shape} ×{calls} | {ms:.1f} ({gflops(shape, ms, calls):.0f} GFLOP/s) |")
    print(f"| paged attention kernel | {attention:.1f} |\n| other torch ops | {report['other_ops_ms']:.1f} |\n"
          f"| rest (Python, scheduling, sampling) | {report['rest_ms']:.1f} |")
    if len(dtypes) > 1:
        base = report["by_kv_cache_dtype"][dtypes[0]]
        print(f"\n| KV dtype | bytes / block | step ms | × {dtypes[0]} | attention ms | × {dtypes[0]} |\n"
              "|---|---|---|---|---|---|")
        for dtype, row in report["by_kv_cache_dtype"].items():
            print(f"| {dtype} | {row['kv_block_bytes']} | {row['step_ms']:.1f} | "
                  f"{row['step_ms'] / base['step_ms']:.2f} | {row['attention_ms']:.1f} | "
                  f"{row['attention_ms'] / base['attention_ms']:.2f} |")


if __name__ == "__main__":
    main()
