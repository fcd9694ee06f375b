"""Task prompts for SolveMath and SolveCoding, and pulling the answer or code out of the reply."""

from __future__ import annotations

import re

MATH_SYSTEM = (
    "You are a careful math tutor. Solve the problem step by step, then finish with a line of the form "
    "'The answer is X.' where X is the final result."
)


def coding_system(language: str) -> str:
    return (
        f"You are an expert {language} programmer. Answer with a short explanation and the complete "
        f"solution in one fenced ```{language} code block."
    )


_ANSWER = re.compile(
    r"answer\s*(?:is\s*:?|:)\s*\$?\s*([^\n]+?)\s*\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE
)
_BOXED = re.compile(r"\\boxed\{([^{}]+)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_answer(solution: str) -> str:
    """The final answer: a \\boxed{} value, else 'the answer is X', else the last number."""
    boxed = _BOXED.findall(solution)
    if boxed:
        return str(boxed[-1]).strip()
    stated = _ANSWER.findall(solution)
    if stated:
        answer = str(stated[-1]).strip().rstrip(".")
        number = _NUMBER.search(answer)
        return (
            number.group(0).replace(",", "")
            if number and number.group(0) == answer.replace(" ", "")
            else answer
        )
    numbers = _NUMBER.findall(solution)
    return str(numbers[-1]).replace(",", "").rstrip(".") if numbers else ""


def extract_code(solution: str) -> str:
    """The first fenced code block, or the whole reply when it has none."""
    match = _FENCE.search(solution)
    if match is None:
        return solution.strip()
    return str(match.group(2)).strip("\n")
