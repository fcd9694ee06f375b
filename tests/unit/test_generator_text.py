"""Text assembly of the generator without a model: stop sequences across pieces, and answer and
code extraction."""

from __future__ import annotations

import pytest

from services.generator.tasks import extract_answer, extract_code
from services.generator.textstream import StopMatcher


def test_stop_sequence_spanning_pieces_is_held_back_and_cut() -> None:
    matcher = StopMatcher(["<END>"])
    emitted = []
    found = False
    for piece in ["Hello <", "E", "N", "D> more"]:
        text, found = matcher.feed(piece)
        emitted.append(text)
        if found:
            break
    assert found
    assert "".join(emitted) == "Hello "


def test_text_that_only_looked_like_a_stop_prefix_is_released() -> None:
    matcher = StopMatcher(["\n\n"])
    first, hit1 = matcher.feed("line one\n")
    second, hit2 = matcher.feed("line two")
    assert (first, hit1) == ("line one", False)
    assert (second, hit2) == ("\nline two", False)
    assert matcher.flush() == ""


def test_earliest_stop_sequence_wins() -> None:
    matcher = StopMatcher(["world", "lo"])
    text, found = matcher.feed("hello world")
    assert found and text == "hel"


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("12 * 7 = 84. The answer is 84.", "84"),
        ("First 3+4=7, then 7*2=14", "14"),
        ("So we get \\boxed{42} in the end, not 41.", "42"),
        ("The answer is: 1,234", "1234"),
        ("No numbers here", ""),
    ],
)
def test_math_answer_is_extracted(solution: str, answer: str) -> None:
    assert extract_answer(solution) == answer


def test_first_fenced_code_block_is_extracted() -> None:
    reply = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nand\n```\nother\n```"
    assert extract_code(reply) == "def add(a, b):\n    return a + b"
    assert extract_code("print(1)") == "print(1)"
