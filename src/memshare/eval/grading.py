"""Answer checking with math-verify: `\\frac12` equals 0.5, boxed answers are extracted, tuples compare."""

from math_verify import parse, verify


def is_correct(output: str, answer: str) -> bool:
    gold = parse(f"${answer}$")
    prediction = parse(output)
    return bool(gold and prediction and verify(gold, prediction))
