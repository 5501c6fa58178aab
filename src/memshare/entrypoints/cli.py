"""`memshare` command line: `memshare generate --model smollm2-135m "Solve 12*13."`."""

import argparse
import json
import sys

from memshare.config import EngineConfig
from memshare.errors import MemShareError
from memshare.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    parser.add_argument("--model", default=defaults.model, help="registered name, HF directory or .gguf file")
    parser.add_argument("--kv-cache-memory", default=defaults.kv_cache_memory, help="KV budget, e.g. 512MiB")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="explicit block count (overrides memory)")
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--num-threads", type=int, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = ("kv_cache_memory", "num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens",
             "max_model_len", "enable_prefix_caching", "device", "dtype", "num_threads")
    return {name: getattr(args, name) for name in names}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, seed=args.seed, stop=args.stop, max_tokens=args.max_tokens,
                          ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> None:
    from memshare.entrypoints.llm import LLM

    params = sampling_params(args)
    llm = LLM(model=args.model, **engine_kwargs(args))
    if args.raw:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    for prompt, output in zip(args.prompts, outputs):
        for sample in output.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": sample.index, "text": sample.text,
                                  "token_ids": sample.token_ids, "finish_reason": sample.finish_reason}))
            else:
                print(f"### {prompt!r} [sample {sample.index}, {len(sample.token_ids)} tokens, "
                      f"{sample.finish_reason}]\n{sample.text}\n")
    print(json.dumps(llm.stats()), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memshare", description="Paged-KV inference with MemShare block sharing")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON line per sample")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (MemShareError, ValueError) as error:
        print(f"memshare: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
