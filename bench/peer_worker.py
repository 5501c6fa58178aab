"""One peer engine in its own process: python bench/peer_worker.py SPEC.json RESULT.json.

Runs under both the project venv and bench/.venv-vllm, so it imports only the stdlib at module level and
never memshare. SPEC holds the peer, the HF directory, the prompt token ids, the pad id and the launch time.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any


def _torch_setup(threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return torch


def hf_generate(spec: dict[str, Any], ready: Callable[[], None]) -> tuple[int, list[int]]:
    torch = _torch_setup(spec["threads"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    prompts: list[list[int]] = spec["prompts"]
    width = max(map(len, prompts))
    ids = torch.tensor([[spec["pad_id"]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ready()
    with torch.inference_mode():
        # min_new_tokens masks EOS, so every row generates exactly max_new_tokens real tokens.
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=spec["max_new_tokens"], min_new_tokens=spec["max_new_tokens"],
                             pad_token_id=spec["pad_id"])
    return int(out[:, width:].numel()), out[0, width:].tolist()


def hf_generate_batch(spec: dict[str, Any], ready: Callable[[], None]) -> tuple[int, list[int]]:
    torch = _torch_setup(spec["threads"])
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    # transformers 5.23 pages the KV cache itself under plain "sdpa" ("sdpa_paged" is no longer a valid name).
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    prompts: list[list[int]] = spec["prompts"]
    page = 256
    # On CPU the cache is otherwise sized to 90% of system RAM; give it what all requests need at once.
    blocks = sum(-(-(len(p) + spec["max_new_tokens"]) // page) for p in prompts)
    cb_config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, auto_switch_to_flash=False)
    # eos_token_id=-1 disables the EOS stop; left None, generate_batch falls back to the model's EOS.
    gen_config = GenerationConfig(max_new_tokens=spec["max_new_tokens"], do_sample=False, eos_token_id=-1)
    ready()
    # No inference_mode here: generation runs on a manager thread, which cannot update inference tensors.
    results = model.generate_batch(inputs=prompts, generation_config=gen_config,
                                   continuous_batching_config=cb_config, progress_bar=False)
    failed = [r.error for r in results.values() if r.error is not None]
    if failed or len(results) != len(prompts):
        raise RuntimeError(f"generate_batch: {len(results)}/{len(prompts)} results, errors {failed[:3]}")
    outputs = list(results.values())
    return sum(len(r.generated_tokens) for r in outputs), outputs[0].generated_tokens


def memshare(spec: dict[str, Any], ready: Callable[[], None]) -> tuple[int, list[int]]:
    from memshare import LLM, SamplingParams

    prompts: list[list[int]] = spec["prompts"]
    llm = LLM(model=spec["model_dir"], kv_cache_memory=f"{spec['kv_gib']}GiB", num_threads=spec["threads"],
              max_num_seqs=len(prompts), log_stats_interval=0)
    params = SamplingParams(temperature=0, max_tokens=spec["max_new_tokens"], ignore_eos=True)
    ready()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs), outs[0].outputs[0].token_ids


def vllm(spec: dict[str, Any], ready: Callable[[], None]) -> tuple[int, list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts: list[list[int]] = spec["prompts"]
    llm = LLM(model=spec["model_dir"], dtype="float32", seed=0, **spec["vllm_args"])
    params = SamplingParams(temperature=0, max_tokens=spec["max_new_tokens"], ignore_eos=True)
    ready()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs), list(outs[0].outputs[0].token_ids)


PEERS: dict[str, Callable[[dict[str, Any], Callable[[], None]], tuple[int, list[int]]]] = {
    "memshare": memshare, "hf_generate": hf_generate, "hf_generate_batch": hf_generate_batch, "vllm": vllm}


def main() -> None:
    spec_path, result_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    marks: dict[str, float] = {}

    def ready() -> None:
        marks["ready_wall"] = time.time()
        marks["ready"] = time.perf_counter()

    tokens, first = PEERS[spec["peer"]](spec, ready)
    elapsed = time.perf_counter() - marks["ready"]
    result = {
        "engine": spec["peer"],
        "output_tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        # Measured from the parent's launch, so interpreter start and imports count as start-up.
        "startup_s": marks["ready_wall"] - spec["launched_at"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Greedy output of prompt 0, to check that the engines agree on weights and prompts.
        "first_output_ids": first,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
