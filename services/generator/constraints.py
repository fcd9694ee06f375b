"""Output constraints as llguidance matchers: compiled once per distinct constraint (a bounded LRU
cache of validated templates), copied per row, and their next-token masks as bit words that the
sampler unpacks. No gRPC, no scheduling here."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from services.common.sampling import Constraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the type stubs only

log = logging.getLogger(__name__)

# Distinct constraints kept compiled; a template holds the grammar's lexer and parser tables.
CACHE_ENTRIES = 128
# A refusal quotes the library's message up to this many lines and characters.
MESSAGE_LINES = 4
MESSAGE_CHARS = 400
# Compact JSON (no whitespace between tokens): small models drift less without optional spaces.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
ANY_OBJECT = '{"type":"object"}'


class ConstraintRefused(ValueError):
    """The library refused a constraint: `field` names the request field, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class CompiledConstraint:
    """A validated matcher in its start state; every row decodes with its own copy."""

    constraint: Constraint
    template: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


def _bounded(message: str) -> str:
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()]
    text = " / ".join(lines[:MESSAGE_LINES])
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _lark_literal(text: str) -> str:
    # A JSON string is a Lark string literal: quotes, backslashes and control characters escaped.
    return json.dumps(text, ensure_ascii=False)


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar of `constraint`; raises ConstraintRefused for an unreadable value."""
    kind, value = constraint.kind, constraint.value
    try:
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(value)
        if kind == "choice":
            choices = json.loads(value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ConstraintRefused(constraint.field, "must be a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(_lark_literal(c) for c in choices)
            )
    except ValueError as error:
        if isinstance(error, ConstraintRefused):
            raise
        raise ConstraintRefused(constraint.field, _bounded(str(error))) from error
    raise ConstraintRefused(constraint.field, f"unknown constraint kind {kind!r}")


class ConstraintCompiler:
    """Compiles constraints for one tokenizer. The llguidance tokenizer is built on first use
    (about 0.3 s); `compile` may run on any thread, `cached` is cheap enough for the event loop."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], entries: int = CACHE_ENTRIES
    ) -> None:
        self._hf_tokenizer = tokenizer
        # The logits may be wider than the tokenizer (padded embeddings): the extra ids stay masked.
        self.vocab_size = max(vocab_size, len(tokenizer))
        fallback = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = sorted(eos_ids) or ([int(fallback)] if fallback is not None else [])
        self.entries = entries
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[Constraint, CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()
        # Apart from the cache's lock: the build takes about 0.3 s, and `cached` runs on the event loop.
        self._tokenizer_lock = threading.Lock()

    @property
    def words(self) -> int:
        """32-bit words in one row's mask."""
        return (self.vocab_size + 31) // 32

    def tokenizer(self, field: str = "parameters") -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer; ConstraintRefused (naming `field`) when llguidance
        cannot read it (it needs a fast tokenizer)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                try:
                    # The engine's EOS ids are llguidance's too: the mask allows them exactly when
                    # the grammar accepts, and the engine ends the row on any of them.
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids
                    )
                except ValueError as error:
                    raise ConstraintRefused(
                        field, f"this model's tokenizer cannot be constrained: {_bounded(str(error))}"
                    ) from error
            return self._tokenizer

    def cached(self, constraint: Constraint) -> CompiledConstraint | None:
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
            return compiled

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The validated template of `constraint` (from the cache when there); raises
        ConstraintRefused with the library's message when the grammar is invalid."""
        compiled = self.cached(constraint)
        if compiled is not None:
            return compiled
        tokenizer = self.tokenizer(constraint.field)
        grammar = grammar_of(constraint)
        # The matcher validates as it builds: one parse of the grammar, not a check and a build.
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ConstraintRefused(constraint.field, _bounded(template.get_error()))
        compiled = CompiledConstraint(constraint, template)
        with self._lock:
            self._cache[constraint] = compiled
            self._cache.move_to_end(constraint)
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._cache)


def fill_masks(
    matchers: Sequence[llguidance.LLMatcher], words: int, vocab_size: int, eos_id: int
) -> torch.Tensor:
    """The refused next tokens [len(matchers), vocab_size] (bool, True = refused) of each matcher
    in its current state. llguidance drops the GIL while it computes, so this overlaps a forward
    pass when run on another thread; numpy only, since torch ops here would contend for the
    forward pass's intra-op threads. A matcher that allows nothing (an error state; it should not
    happen) gets its EOS, so that its row ends instead of sampling from an empty distribution."""
    bits = np.zeros((len(matchers), words), dtype=np.uint32)
    for i, matcher in enumerate(matchers):
        matcher.unsafe_compute_mask_ptr(bits[i].ctypes.data, words * 4)
    for i in np.flatnonzero(~bits.any(axis=1)).tolist():
        log.error("a constrained row allows no token (%s); ending it", matchers[i].get_error() or "no error")
        bits[i, eos_id // 32] |= np.uint32(1 << (eos_id % 32))
    # Bit k of word w is token 32 * w + k; the byte view of little-endian words keeps that order.
    refused = np.unpackbits((~bits).view(np.uint8), axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(refused).view(torch.bool)
