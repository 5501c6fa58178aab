"""`memshare` command line: generate, serve, demo, calibrate, eval, replay, report, bench, fidelity."""

import argparse
import json
import os
import sys
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from memshare.config import (
    EngineConfig,
    ServerConfig,
    policy_names,
    registration,
    share_config,
)
from memshare.errors import MemShareError
from memshare.eval.datasets import DEFAULT_INSTRUCTION
from memshare.sampling_params import SamplingParams
from memshare.sharing.configs import STAGE2_METRICS


def engine_flag_fields() -> list[Field]:
    """The fields of `EngineConfig` that are command-line flags: those with a `help` in their metadata."""
    return [spec for spec in fields(EngineConfig) if "help" in spec.metadata]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """A flag per documented field of `EngineConfig`, with its default, help, choices and vLLM's spellings."""
    for spec in engine_flag_fields():
        names = ["--" + spec.name.replace("_", "-"), *spec.metadata.get("aliases", ())]
        if isinstance(spec.default, bool):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=spec.default,
                                help=spec.metadata["help"])
        else:
            parser.add_argument(*names, type=spec.metadata.get("type", type(spec.default)), default=spec.default,
                                choices=spec.metadata.get("choices"), help=spec.metadata["help"])


def flag_fields() -> dict[str, tuple[Field, list[str]]]:
    """The fields of the registered policies' configs that have a command-line flag (those with a `help` in their
    metadata), each with the policies that have it."""
    flags: dict[str, tuple[Field, list[str]]] = {}
    for name in policy_names():
        for spec in fields(registration(name).config):
            if "help" in spec.metadata:
                flags.setdefault(spec.name, (spec, []))[1].append(name)
    return flags


def add_share_args(parser: argparse.ArgumentParser) -> None:
    """`--share` and a flag per documented field of every registered policy's config."""
    group = parser.add_argument_group("KV policy", "--share picks the policy; the other flags set its fields")
    group.add_argument("--share", default="none", choices=policy_names(), help="KV sharing or eviction policy")
    for name, (spec, owners) in flag_fields().items():
        group.add_argument("--" + name.replace("_", "-"), type=spec.type, default=None,
                           choices=spec.metadata.get("choices"),
                           help=f"{spec.metadata['help']} ({', '.join(owners)}; default {spec.default})")


def share_values(args: argparse.Namespace) -> dict[str, Any]:
    """The policy fields given on the command line."""
    return {name: getattr(args, name) for name in flag_fields() if getattr(args, name, None) is not None}


def engine_kwargs(args: argparse.Namespace) -> dict:
    """`EngineConfig` keywords from the engine flags (the model apart: callers pass it on its own)."""
    kwargs = {spec.name: getattr(args, spec.name) for spec in engine_flag_fields() if spec.name != "model"}
    if hasattr(args, "share"):
        kwargs["share"] = share_config(args.share, **share_values(args))
    return kwargs


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
    from memshare.engine.llm import LLM

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


def cmd_demo(args: argparse.Namespace) -> None:
    from memshare.eval.demo import DemoConfig, run_demo, sample_answer

    config = DemoConfig(model=args.model, out=args.out, num_traces=args.num_traces, max_tokens=args.max_tokens,
                        num_kv_blocks=args.num_kv_blocks, step_thresholds=tuple(args.step_thresholds),
                        block_thresholds=tuple(args.block_thresholds))
    print(f"== {config.num_traces} MATH-500 re-verification traces forced through {config.model}: dense, then "
          f"MemShare at step/block thresholds {list(zip(config.step_thresholds, config.block_thresholds))}, "
          f"all at once into {config.num_kv_blocks} KV blocks", flush=True)
    report = run_demo(config)
    print(f"\n{report}\nwrote {config.out / 'report.md'} and its plots", flush=True)
    question = "A train travels 120 km in 1.5 hours. What is its average speed in km/h?"
    print(f"\n== a sampled answer with MemShare on\n>>> {question}\n{sample_answer(config, question)}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from memshare.engine.llm_engine import LLMEngine
    from memshare.eval.calibrate import calibrate
    from memshare.eval.datasets import chat_prompt, load_problems

    engine = LLMEngine(EngineConfig(model=args.model, log_stats_interval=0, **engine_kwargs(args)))
    problems = load_problems(args.dataset, args.num_problems)
    prompts = [chat_prompt(engine.tokenizer, p) for p in problems]
    result = calibrate(engine, prompts, args.max_tokens, args.max_false_share, metric=args.stage2)
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "block_threshold": result.block_threshold,
                                         "false_share_rate": result.false_share_rate,
                                         "repeat_recall": result.repeat_recall, "repeats": result.repeats,
                                         "unrelated_same_request": result.unrelated_same_request,
                                         "unrelated_other_requests": result.unrelated_other_requests}))


def add_sampled_run_args(parser: argparse.ArgumentParser, max_tokens: int, unit: str) -> None:
    """Sampling flags of the dataset runs (bench, eval), at the reasoning models' usual settings."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help=f"{unit} i samples with seed + i")


def add_policy_args(parser: argparse.ArgumentParser, policies: str) -> None:
    """The share flags, which `--policies` specs (`policy:field=value`) start from."""
    add_share_args(parser)
    parser.add_argument("--policies", default=policies, help="policy[:field=value...] specs run in order, e.g. "
                        "none,memshare:block_threshold=0.61,random:share_ratio=memshare,h2o:kv_budget=memshare")
    parser.add_argument("--sweep", action="append", default=None, metavar="FIELD=V1,V2,...",
                        help="run the specs once per value (repeatable, zipped): the field is set on every spec whose "
                        "policy has it as a knob, e.g. --sweep step_threshold=0.7,0.5 --sweep block_threshold=0.62,0.5")


def policy_defaults(args: argparse.Namespace) -> dict[str, Any]:
    if args.share != "none":
        raise ValueError(f"{args.command} runs the policies of --policies; --share does not apply")
    return share_values(args)


def policy_specs(args: argparse.Namespace) -> list:
    from memshare.eval.policies import expand_sweep, parse_policies, parse_sweep

    return expand_sweep(parse_policies(args.policies, policy_defaults(args)), parse_sweep(args.sweep))


def cmd_bench(args: argparse.Namespace) -> None:
    from memshare.eval.bench import markdown_table, run_bench, save
    from memshare.eval.datasets import load_problems
    from memshare.eval.policies import expand_kv_dtypes

    engine = engine_kwargs(args) | {"log_stats_interval": 0}
    del engine["share"]
    specs = expand_kv_dtypes(policy_specs(args), engine.pop("kv_cache_dtype").split(","))
    problems = load_problems("gsm8k", args.num_requests)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    results = run_bench(args.model, specs, problems, params, args.seed, **engine)
    title = f"{args.model}, {len(problems)} GSM8K requests, KV {results[0].stats['num_kv_blocks']} blocks"
    json_path, png_path = save(results, args.out, title)
    print(f"\n{markdown_table(results)}\n\nwrote {json_path} and {png_path}")


def cmd_fidelity(args: argparse.Namespace) -> None:
    from memshare.eval.fidelity import load_traces, markdown_table, model_tokenizer, run_fidelity, save

    specs = policy_specs(args)
    engine = engine_kwargs(args) | {"log_stats_interval": 0}
    del engine["share"]
    traces = load_traces(model_tokenizer(args.model), args.num_traces, args.max_tokens)
    results = run_fidelity(args.model, specs, traces, **engine)
    paths = save(results, args.out, f"{args.model}, {len(traces)} MATH-500 traces")
    print(f"\n{markdown_table(results)}\n\nwrote {', '.join(map(str, paths))}")


def cmd_eval(args: argparse.Namespace) -> None:
    from memshare.eval.harness import EvalConfig, run_eval
    from memshare.eval.policies import parse_sweep

    defaults = policy_defaults(args)
    engine = engine_kwargs(args)
    del engine["share"]
    config = EvalConfig(model=args.model, dataset=args.dataset, out=args.out, policies=args.policies,
                        sweep=parse_sweep(args.sweep), kv_cache_dtypes=engine.pop("kv_cache_dtype").split(","),
                        defaults=defaults,
                        problem_field=args.problem_field, answer_field=args.answer_field, limit=args.limit,
                        samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_tokens, seed=args.seed, instruction=args.instruction, engine=engine)
    for s in run_eval(config):
        print(f"{s['run']}: pass@1 {s['pass@1']:.1%} ± {s['ci95']:.1%} over {s['num_problems']} problems, memory "
              f"saved {s['memory_saved_mean']:.1%} (peak {s['memory_saved_peak']:.1%}), "
              f"{s['generation_tokens_per_s']:.1f} tok/s")
    print(f"runs are in {args.out}; `memshare report {args.out}` tabulates and plots them")


def cmd_replay(args: argparse.Namespace) -> None:
    from memshare.eval.policies import parse_sweep
    from memshare.eval.replay import ReplayConfig, run_replay
    from memshare.eval.report import build_report

    engine = engine_kwargs(args)
    del engine["share"]
    config = ReplayConfig(model=args.model, traces=args.traces, out=args.out, policies=args.policies,
                          sweep=parse_sweep(args.sweep), kv_cache_dtypes=engine.pop("kv_cache_dtype").split(","),
                          defaults=policy_defaults(args), prompt_field=args.prompt_field,
                          response_field=args.response_field, limit=args.limit, max_tokens=args.max_tokens,
                          top_k=args.top_k, engine=engine)
    for s in run_replay(config):
        kl = "" if s["kl"] is None else f", KL {s['kl']:.4f}, top-1 {s['top1']:.1%}"
        print(f"{s['run']}: {s['output_tokens_per_s']:.1f} tok/s, batch {s['num_running_mean']:.1f} (peak "
              f"{s['num_running_peak']}), {s['num_preemptions']} preemptions, memory saved {s['memory_saved_mean']:.1%}"
              f" (KV bytes saved vs float32 {s['kv_bytes_saved_vs_float32']:.1%}){kl}")
    build_report(args.out)
    print(f"wrote {args.out / 'report.md'} and its plots")


def cmd_report(args: argparse.Namespace) -> None:
    from memshare.eval.report import build_report

    print(build_report(args.dir))
    print(f"wrote {args.dir / 'report.md'} and its plots")


def cmd_serve(args: argparse.Namespace) -> None:
    from memshare.entrypoints.openai.api_server import run_server

    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("MEMSHARE_API_KEY"),
                          served_model_name=args.served_model_name, max_request_bytes=args.max_request_bytes,
                          max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
                          shutdown_timeout=args.shutdown_timeout)
    run_server(EngineConfig(model=args.model, **engine_kwargs(args)), config)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memshare", description="Paged-KV inference with MemShare block sharing")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON line per sample")
    add_engine_args(gen)
    add_share_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="dense vs. MemShare on forced re-verification traces under a KV budget where "
                          "dense preempts: tok/s on identical tokens, batch, preemptions, memory saved, KL; then a "
                          "sampled answer")
    demo.add_argument("--model", default=EngineConfig().model, help="registered name, HF directory or .gguf file")
    demo.add_argument("--num-traces", type=int, default=12)
    demo.add_argument("--max-tokens", type=int, default=256, help="forced tokens per trace")
    demo.add_argument("--num-kv-blocks", type=int, default=128, help="the KV budget, in blocks of 16 tokens")
    demo.add_argument("--step-thresholds", type=_floats, default=[0.7, 0.5], help="MemShare levels, e.g. 0.7,0.5")
    demo.add_argument("--block-thresholds", type=_floats, default=[0.62, 0.5], help="as many as --step-thresholds")
    demo.add_argument("--out", type=Path, default=Path("results/demo"))
    demo.set_defaults(func=cmd_demo)

    cal = sub.add_parser("calibrate", help="measure stage-2 similarities on a model and propose block_threshold")
    add_engine_args(cal)
    cal.add_argument("--dataset", default="gsm8k", help="gsm8k, math500, or a JSONL file with problem/answer")
    cal.add_argument("--num-problems", type=int, default=8)
    cal.add_argument("--max-tokens", type=int, default=256, help="length of the answers that are repeated")
    cal.add_argument("--max-false-share", type=float, default=0.01,
                     help="largest acceptable share rate among unrelated block pairs")
    cal.add_argument("--json", type=Path, default=None, help="also write the distributions here")
    cal.add_argument("--stage2", default="euclidean", choices=STAGE2_METRICS, help="block similarity measured")
    cal.set_defaults(func=cmd_calibrate)

    bench = sub.add_parser("bench", help="concurrent GSM8K requests under one KV budget, per policy: throughput, "
                           "KV blocks, preemptions, TTFT/TPOT percentiles")
    add_engine_args(bench)
    add_policy_args(bench, "none,memshare")
    bench.set_defaults(kv_cache_memory="256MiB")
    bench.add_argument("--num-requests", type=int, default=64)
    add_sampled_run_args(bench, 512, "request")
    bench.add_argument("--out", type=Path, default=Path("results/bench"))
    bench.set_defaults(func=cmd_bench)

    fid = sub.add_parser("fidelity", help="teacher-force MATH-500 traces through dense and each policy in "
                         "lockstep: KL(dense || policy) and top-1 agreement per token (the KV cache holds every trace "
                         "at once unless --num-kv-blocks is given)")
    add_engine_args(fid)
    add_policy_args(fid, "memshare")
    fid.add_argument("--num-traces", type=int, default=16)
    fid.add_argument("--max-tokens", type=int, default=1024, help="forced tokens per trace (solution twice)")
    fid.add_argument("--out", type=Path, default=Path("results/fidelity"))
    fid.set_defaults(func=cmd_fidelity)

    ev = sub.add_parser("eval", help="pass@1 and KV stats of sharing policies on a dataset, one resumable JSONL "
                        "per run")
    add_engine_args(ev)
    add_policy_args(ev, "none,memshare")
    ev.add_argument("--dataset", required=True, help="gsm8k, math500, or a JSONL file")
    ev.add_argument("--problem-field", default="problem", help="JSONL field holding the problem")
    ev.add_argument("--answer-field", default="answer", help="JSONL field holding the reference answer")
    ev.add_argument("--limit", type=int, default=None, help="the first N problems (default: all)")
    ev.add_argument("--samples", type=int, default=1, help="samples per problem; pass@1 averages them")
    add_sampled_run_args(ev, 1024, "problem")
    ev.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="appended to every problem")
    ev.add_argument("--out", type=Path, default=Path("results/eval"))
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("replay", help="teacher-force a JSONL of reasoning traces through each policy under one KV "
                        "budget: tok/s on identical tokens, batch, preemptions, memory saved, KL and top-1 vs dense; "
                        "one resumable JSONL per run")
    add_engine_args(rp)
    add_policy_args(rp, "none,memshare")
    rp.add_argument("--traces", type=Path, required=True, help="JSONL: a prompt (text or OpenAI messages) and the "
                    "response to force, per line")
    rp.add_argument("--prompt-field", default=None, help="default: the first of prompt, question, messages")
    rp.add_argument("--response-field", default="response")
    rp.add_argument("--limit", type=int, default=None, help="the first N traces (default: all)")
    rp.add_argument("--max-tokens", type=int, default=2048, help="forced tokens per trace (responses are cut)")
    rp.add_argument("--top-k", type=int, default=20, help="dense log-probabilities kept per token for the KL")
    rp.add_argument("--out", type=Path, default=Path("results/replay"))
    rp.set_defaults(func=cmd_replay)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions "
                         "(streaming), /v1/models, /health, /metrics")
    add_engine_args(srv)
    add_share_args(srv)
    server_defaults = ServerConfig()
    srv.add_argument("--host", default=server_defaults.host, help="0.0.0.0 to listen on every interface")
    srv.add_argument("--port", type=int, default=server_defaults.port)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or MEMSHARE_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    srv.add_argument("--max-request-bytes", type=int, default=server_defaults.max_request_bytes)
    srv.add_argument("--max-tokens-limit", type=int, default=server_defaults.max_tokens_limit,
                     help="largest max_tokens a request may ask for; also the default for chat")
    srv.add_argument("--max-n", type=int, default=server_defaults.max_n, help="largest n a request may ask for")
    srv.add_argument("--shutdown-timeout", type=float, default=server_defaults.shutdown_timeout,
                     help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    srv.set_defaults(func=cmd_serve)

    rep = sub.add_parser("report", help="Markdown tables and plots of the eval and replay runs under DIR")
    rep.add_argument("dir", type=Path)
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (MemShareError, ValueError, FileNotFoundError) as error:
        print(f"memshare: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
