"""How much more would finer sharing find? Whole blocks of 16 and 8 tokens against (block, layer) pairs, on real traces.

    python -m bench.granularity [--model smollm2-135m] [--traces ../shared/data/qwq-traces/traces.jsonl]
                                [--max-tokens 512] [--out docs/bench/granularity]

Each trace (chat prompt + the recorded response, cut at --max-tokens) goes through the Hugging Face model once;
hooks keep every layer's keys before RoPE and its values. For every full generated block and every threshold t, it
counts whether some earlier block (prompt included) reaches MemShare's stage-2 similarity t:
- whole block: the mean over layers of (s(K) + s(V)) / 2 reaches t (what MemShare shares today);
- per layer: that layer's (s(K) + s(V)) / 2 reaches t, counted per (block, layer) pair (what per-layer block tables
  could share; the fraction of pairs is the fraction of generated KV they would free).
Stage 1 is left out, so each count is an upper bound of what sharing at t finds. Writes results.json and a PNG.
"""

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from memshare.eval.fidelity import model_tokenizer
from memshare.eval.replay import read_trace_file, tokenize
from memshare.models.weights import resolve_model
from memshare.sharing.stage2 import relative_similarity

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "granularity"
TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "qwq-traces" / "traces.jsonl"
THRESHOLDS = [round(0.4 + 0.05 * i, 2) for i in range(11)]
BLOCK_SIZES = (16, 8)
CALIBRATED = 0.62  # smollm2's calibrated block threshold


def layer_kv(model: AutoModelForCausalLM, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys before RoPE and values of every layer: each [layers, tokens, kv_heads * head_dim]."""
    keys, values, hooks = [], [], []
    for layer in model.model.layers:
        attn = layer.self_attn
        key_module = getattr(attn, "k_norm", None) or attn.k_proj  # Qwen3 normalizes keys before RoPE
        hooks.append(key_module.register_forward_hook(lambda m, i, out: keys.append(out.flatten(2)[0])))
        hooks.append(attn.v_proj.register_forward_hook(lambda m, i, out: values.append(out[0])))
    try:
        with torch.inference_mode():
            model(torch.tensor([token_ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(keys).float(), torch.stack(values).float()


def best_earlier(keys: torch.Tensor, values: torch.Tensor, block_size: int, first: int) -> tuple[np.ndarray, ...]:
    """Best similarity to an earlier block, per generated block: (whole block [n], per layer [layers, n])."""
    layers, tokens, _ = keys.shape
    n = tokens // block_size
    k = keys[:, : n * block_size].reshape(layers, n, -1)
    v = values[:, : n * block_size].reshape(layers, n, -1)
    pair = (relative_similarity(k, k) + relative_similarity(v, v)) / 2  # [layers, n, n]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)  # row b, column a < b
    whole = pair.mean(0).masked_fill(~earlier, -1).max(1).values[first:]
    per_layer = pair.masked_fill(~earlier, -1).max(2).values[:, first:]
    return whole.numpy(), per_layer.numpy()


def measure(model_name: str, traces_path: Path, max_tokens: int) -> dict:
    path, gguf_file = resolve_model(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32).eval()
    traces = tokenize(model_tokenizer(model_name), read_trace_file(traces_path), max_tokens)
    best = {bs: ([], []) for bs in BLOCK_SIZES}
    for trace in tqdm(traces, desc="traces"):
        keys, values = layer_kv(model, trace.prompt_token_ids + trace.token_ids)
        for bs in BLOCK_SIZES:
            whole, per_layer = best_earlier(keys, values, bs, -(-len(trace.prompt_token_ids) // bs))
            best[bs][0].append(whole)
            best[bs][1].append(per_layer)
    result = {"model": model_name, "traces": str(traces_path), "num_traces": len(traces), "max_tokens": max_tokens,
              "thresholds": THRESHOLDS, "num_layers": len(model.model.layers), "block_sizes": {}}
    for bs, (wholes, layers) in best.items():
        whole, per_layer = np.concatenate(wholes), np.concatenate(layers, axis=1)
        result["block_sizes"][str(bs)] = {
            "generated_blocks": int(whole.size),
            "whole_block": [float((whole >= t).mean()) for t in THRESHOLDS],
            "per_layer": [float((per_layer >= t).mean()) for t in THRESHOLDS],
            "per_layer_at_calibrated": [float(x) for x in (per_layer >= CALIBRATED).mean(1)],
            "median_whole": float(np.median(whole)), "median_per_layer": [float(x) for x in np.median(per_layer, 1)]}
    return result


def plot(result: dict, png: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for bs, data in result["block_sizes"].items():
        left.plot(result["thresholds"], data["whole_block"], marker="o", label=f"whole block, {bs} tokens")
        left.plot(result["thresholds"], data["per_layer"], marker="s", linestyle="--", label=f"per layer, {bs} tokens")
        right.plot(data["per_layer_at_calibrated"], marker=".", label=f"{bs} tokens")
    left.set(xlabel="stage-2 similarity threshold", ylabel="fraction with an earlier match at or above it",
             title=f"{result['model']}: shareable generated KV ({result['num_traces']} traces)")
    right.set(xlabel="layer", ylabel=f"fraction of blocks at >= {CALIBRATED}", title="per layer, calibrated threshold")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = measure(args.model, args.traces, args.max_tokens)
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "granularity.png")
    rows = ["| threshold | " + " | ".join(f"whole {bs} | per layer {bs}" for bs in BLOCK_SIZES) + " |",
            "|---|" + "---|---|" * len(BLOCK_SIZES)]
    for i, t in enumerate(result["thresholds"]):
        cells = [f"{d['whole_block'][i]:.1%} | {d['per_layer'][i]:.1%}" for d in result["block_sizes"].values()]
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    print("\n".join(rows) + f"\n\nwrote {out / 'results.json'} and {out / 'granularity.png'}")


if __name__ == "__main__":
    main()
