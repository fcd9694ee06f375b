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
