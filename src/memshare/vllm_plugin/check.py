"""A self-check of MemShare inside vLLM, on your hardware and with your engine arguments.

    python -m memshare.vllm_plugin.check --model <path or id> [vLLM engine args: --tensor-parallel-size 2,
        --kv-cache-dtype fp8, --block-size 32, --dtype float32, ...]

Three short runs, one engine after another:
1. plain vLLM (MemShare off): greedy tokens of a repetitive prompt;
2. MemShare with thresholds above 1 (stage 2 scores candidates, nothing is shared): the tokens must equal run 1's;
3. MemShare at low thresholds on a forced, block-aligned repetitive trace, with `verify` on: blocks must be shared,
   every rank's block-table rows must equal the scheduler's after every step, vLLM's free blocks must rise by exactly
   the blocks shared, and the output must equal the forced tokens.
It prints the KV layout each rank found, the counters and a verdict; the exit status is 0 when every check passes.
"""

import dataclasses
import gc
import json
import sys
from typing import Any

from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from memshare.vllm_plugin import memshare_stats
from memshare.vllm_plugin.forced import forced_tokens_processor

PASSAGE = ("The river flows past the old mill every spring, carrying leaves and small branches down to the sea, "
           "where the fishermen wait for the tide to turn before they row out to the nets. ")
NEUTRAL = {"step_threshold": 0.0, "block_threshold": 1.01}
SHARING = {"step_threshold": 0.3, "block_threshold": 0.5, "verify": True}


def make_llm(engine_args: EngineArgs, memshare: dict | None, **overrides: Any) -> LLM:
    options = {field.name: getattr(engine_args, field.name) for field in dataclasses.fields(engine_args)}
    additional = dict(options.get("additional_config") or {})
    additional.pop("memshare", None)
    if memshare is not None:
        additional["memshare"] = memshare
    return LLM(**{**options, "additional_config": additional, **overrides})


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate_forced(llm: LLM, repeats: int = 4) -> bool:
    """Two requests forced through `forced_trace`; whether both outputs equal the forced tokens."""
    prompt, forced = forced_trace(llm, repeats)
    params = SamplingParams(temperature=0, max_tokens=len(forced), ignore_eos=True,
                            extra_args={"forced_token_ids": forced})
    outputs = llm.generate([{"prompt_token_ids": prompt}] * 2, params, use_tqdm=False)
    return all(list(o.outputs[0].token_ids) == forced for o in outputs)


def forced_trace(llm: LLM, repeats: int = 4) -> tuple[list[int], list[int]]:
    """(prompt, response) token ids: the prompt a whole number of blocks, the response one block-long passage ending in
    a blank line (a step boundary), repeated, so each repeat fills exactly one block."""
    tokenizer = llm.get_tokenizer()
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    words = tokenizer.encode(PASSAGE * (1 + block_size // 16), add_special_tokens=False)
    passage = words[:block_size - 1] + tokenizer.encode("\n\n", add_special_tokens=False)[-1:]
    prompt = tokenizer.encode("Repeat this:", add_special_tokens=False)
    prompt = (prompt + words * block_size)[:block_size]
    return prompt, passage * repeats


def run(engine_args: EngineArgs) -> tuple[dict[str, Any], list[str]]:
    prompt = {"prompt": (PASSAGE + "\n\n") * 2}  # a model continues repeating it, in blank-line-separated steps
    greedy = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    found: dict[str, Any] = {}

    llm = make_llm(engine_args, None)
    plain = list(llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids)
    close(llm)

    llm = make_llm(engine_args, NEUTRAL)
    found["ranks"] = llm.collective_rpc("memshare_describe")
    neutral = list(llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids)
    found["thresholds_above_1"] = memshare_stats(llm)
    close(llm)

    processor = forced_tokens_processor(engine_args.create_engine_config())
    llm = make_llm(engine_args, SHARING, logits_processors=[processor])
    outputs_forced = generate_forced(llm)
    found["forced_trace"] = memshare_stats(llm)
    close(llm)

    sharing = found["forced_trace"]
    failures = [message for ok, message in [
        (neutral == plain, "thresholds above 1: tokens differ from plain vLLM's"),
        (found["thresholds_above_1"].get("stage2_pairs", 0) > 0, "thresholds above 1: stage 2 scored no pair"),
        (sharing.get("blocks_shared", 0) > 0, "forced repetitive trace: no block was shared"),
        (sharing.get("rows_checked", 0) > 0, "forced repetitive trace: no worker row was checked"),
        (sharing.get("row_mismatches", 1) == 0, "a worker's block-table row differed from the scheduler's"),
        (sharing.get("free_block_mismatches", 1) == 0, "vLLM's free blocks did not rise by the blocks shared"),
        (outputs_forced, "the output differs from the forced tokens"),
    ] if not ok]
    return found, failures


def main(argv: list[str] | None = None) -> int:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(description=__doc__))
    engine_args = EngineArgs.from_cli_args(parser.parse_args(argv))
    found, failures = run(engine_args)
    print(json.dumps(found, indent=1, default=str))
    for failure in failures:
        print(f"FAIL: {failure}")
    print("MemShare self-check:", "PASS" if not failures else f"FAIL ({len(failures)} checks)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
