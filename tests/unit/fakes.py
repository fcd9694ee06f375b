"""Fakes for the fast tier: a Runner, a tokenizer and an embedding model that follow tiny
deterministic rules, so that the engine, the batcher and the cache run without a model file."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from services.embedder.models import EmbeddingModel
from services.embedder.spec import ModelSpec
from services.generator.engine import Engine, Request, SchedulerLimits, TokenEvent
from services.generator.runner import BeamSettings, ModelFacts

T = TypeVar("T")

# Seconds any single await in a unit test may take before the test fails instead of hanging.
AWAIT_TIMEOUT = 10.0

EOS = 0
# Id 0 is EOS; then one id per letter and a few multi-character pieces for stops across tokens.
DEFAULT_PIECES: tuple[str, ...] = (
    "<eos>",
    *"abcdefghijklmnopqrstuvwxyz",
    " ",
    "he",
    "llo",
    " wor",
    "ld",
    "!",
)


async def within(awaitable: Awaitable[T], limit_s: float = AWAIT_TIMEOUT) -> T:
    """`awaitable`'s result, or a TimeoutError after `limit_s` seconds."""
    return await asyncio.wait_for(awaitable, limit_s)


async def eventually(condition: Callable[[], bool], limit_s: float = AWAIT_TIMEOUT) -> None:
    """Poll until `condition()` holds; fail after `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def drain(request: Request, limit_s: float = AWAIT_TIMEOUT) -> list[TokenEvent]:
    """Every event of `request` until it ends."""

    async def collect() -> list[TokenEvent]:
        return [event async for event in request.events()]

    return await within(collect(), limit_s)


class FakeTokenizer:
    """Each id decodes to one fixed piece; encoding takes the longest piece at each position."""

    def __init__(self, pieces: Sequence[str] = DEFAULT_PIECES) -> None:
        self.pieces = list(pieces)
        self.eos_token_id = EOS
        self.pad_token_id: int | None = None
        self.all_special_ids = [EOS]
        self._by_length = sorted(
            ((piece, i) for i, piece in enumerate(self.pieces) if i not in self.all_special_ids),
            key=lambda item: -len(item[0]),
        )

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        at = 0
        while at < len(text):
            for piece, token in self._by_length:
                if text.startswith(piece, at):
                    ids.append(token)
                    at += len(piece)
                    break
            else:
                raise ValueError(f"no piece for {text[at:]!r}")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return "".join(self.pieces[i] for i in ids if i not in special)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.pieces[i] for i in ids]

    def apply_chat_template(
        self, conversation: Sequence[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> list[int]:
        text = "".join(f"{m['role']} {m['content']} " for m in conversation)
        return self.encode(text + ("a " if add_generation_prompt else ""))


def next_letter(token: int) -> int:
    """The default rule: each id is followed by the next one, wrapping past the last to 'a'."""
    return token + 1 if 1 <= token < len(DEFAULT_PIECES) - 1 else 1


class FakeRunner:
    """A Runner whose logits for a row depend on its last token only: the successor of that token
    gets `peak`, the rest a fixed spread, so greedy decoding follows `successor` and sampling
    draws from a real distribution. Counts the calls and the rows of each."""

    backend = "fake"

    def __init__(
        self,
        vocab_size: int = len(DEFAULT_PIECES),
        successor: Callable[[int], int] = next_letter,
        context_length: int = 256,
        peak: float = 3.0,
    ) -> None:
        self.facts = ModelFacts(vocab_size, context_length, frozenset({EOS}))
        self.successor = successor
        self.peak = peak
        self.prefill_rows: list[int] = []
        # Per decode call, the first prompt token of every row: tests tag requests with it.
        self.decoded: list[list[int]] = []
        self.selected: list[list[int]] = []
        self.merges = 0
        # When set, each decode waits for one release (see `allow`) so a test can pace the steps.
        self.gate: threading.Semaphore | None = None
        self.fail_next_decode = False

    def hold(self) -> None:
        self.gate = threading.Semaphore(0)

    def allow(self, steps: int = 1) -> None:
        assert self.gate is not None
        self.gate.release(steps)

    def free(self) -> None:
        """Stop pacing: every pending and later decode runs at once."""
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.release(1000)

    @property
    def decode_rows(self) -> list[int]:
        return [len(rows) for rows in self.decoded]

    def _logits(self, last: Sequence[int]) -> torch.Tensor:
        vocab = self.facts.vocab_size
        positions = torch.arange(vocab, dtype=torch.float32)
        rows = []
        for token in last:
            row = torch.sin(positions * (token + 1) * 0.7)
            row[self.successor(token)] = self.peak
            rows.append(row)
        return torch.stack(rows)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any]:
        self.prefill_rows.append(len(prompts))
        state = [list(prompt) for prompt in prompts]
        return self._logits([row[-1] for row in state]), state

    def decode(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        gate = self.gate
        if gate is not None and not gate.acquire(timeout=AWAIT_TIMEOUT):
            raise TimeoutError("the test never allowed this decode step")
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("the fake runner failed a step")
        rows: list[list[int]] = state
        assert len(rows) == len(tokens)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.append(int(token))
        self.decoded.append([row[0] for row in rows])
        return self._logits([row[-1] for row in rows])

    def select(self, state: Any, rows: Sequence[int]) -> Any:
        self.selected.append(list(rows))
        return [list(state[i]) for i in rows]

    def merge(self, first: Any, second: Any) -> Any:
        self.merges += 1
        return [*first, *second]

    def beam_search(self, prompt_ids: Sequence[int], settings: BeamSettings) -> list[list[int]]:
        raise NotImplementedError("the fast tier does not test beam search")


class EngineFactory(Protocol):
    """The `make_engine` fixture: an Engine over fakes, started unless start=False."""

    def __call__(
        self,
        runner: FakeRunner | None = None,
        limits: SchedulerLimits | None = None,
        tokenizer: FakeTokenizer | None = None,
        start: bool = True,
    ) -> Engine: ...


class FakeEmbeddingModel(EmbeddingModel):
    """An embedding model whose vector of a sequence is (length, sum of ids, first id, 1).

    Records each batch it embeds; fails a batch that holds `poison`; with `hold()` each batch
    waits for a release so that a test can queue inputs behind a running one."""

    def __init__(self, name: str = "fake", size_bytes: int = 1 << 20, poison: int | None = None) -> None:
        self.spec = ModelSpec(name, name, "cpu", "float32")
        self.name = name
        self.size_bytes = size_bytes
        self.dimensions = 4
        self.max_seq_length = 512
        self.vocab_size = 1000
        self.poison = poison
        self.batches: list[list[list[int]]] = []
        self.gate: threading.Semaphore | None = None
        self.entered = threading.Event()

    def hold(self) -> None:
        self.gate = threading.Semaphore(0)

    def allow(self, batches: int = 1) -> None:
        assert self.gate is not None
        self.gate.release(batches)

    def embed(self, batch: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        self.entered.set()
        if self.gate is not None and not self.gate.acquire(timeout=AWAIT_TIMEOUT):
            raise TimeoutError("the test never allowed this batch")
        rows = [list(ids) for ids in batch]
        self.batches.append(rows)
        if self.poison is not None and any(self.poison in ids for ids in rows):
            raise ValueError("poisoned batch")
        return np.array([[len(ids), sum(ids), ids[0], 1.0] for ids in rows], dtype=np.float32)


def expected_vector(ids: Sequence[int]) -> list[float]:
    return [float(len(ids)), float(sum(ids)), float(ids[0]), 1.0]
