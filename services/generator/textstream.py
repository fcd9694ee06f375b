"""Turning generated token ids into text as they arrive: incremental detokenization that never
emits half a UTF-8 character, and stop sequences that may span tokens and are never emitted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a short window of ids per token instead of the whole text (as TGI and vLLM do):
    the text of the window minus the text of its prefix is what the newest ids add, once it no
    longer ends in an incomplete character."""

    def __init__(self, tokenizer: Any, prompt_tail: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # A few prompt ids give the first generated tokens their context (leading spaces).
        self._ids: list[int] = list(prompt_tail)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        text = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            new = text[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return str(new)
        return ""


class StopMatcher:
    """Holds back text that could still be the start of a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop sequence was found)."""
        if not self._stops:
            return text, False
        pending = self._pending + text
        cut = -1
        for stop in self._stops:
            index = pending.find(stop)
            if index >= 0 and (cut < 0 or index < cut):
                cut = index
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if stop.startswith(pending[-size:]):
                    hold = size
                    break
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_alphabet()


class TokenPieces:
    """Each token's text alone (the tokenizer's decoding of that one id, as OpenAI's `token`)
    and its UTF-8 bytes, where a token holding part of a character keeps its partial bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        known = self._known.get(token_id)
        if known is None:
            text: str = self._tokenizer.decode([token_id])
            known = (text, self._raw_bytes(token_id) if REPLACEMENT in text else text.encode())
            self._known[token_id] = known
        return known

    def _raw_bytes(self, token_id: int) -> bytes:
        """The bytes a lossy decoding stands for: a byte-fallback piece (<0xE2>) or a byte-level
        BPE piece (GPT-2's alphabet); else the decoding's own bytes."""
        raw = str(self._tokenizer.convert_ids_to_tokens([token_id])[0])
        if len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
            try:
                return bytes([int(raw[3:5], 16)])
            except ValueError:
                pass
        if raw and all(c in _BYTE_LEVEL for c in raw):
            return bytes(_BYTE_LEVEL[c] for c in raw)
        return str(self._tokenizer.decode([token_id])).encode()
