"""What the engine needs from a model backend: prefill prompts, decode one token for every row of
a running batch, and reshape that batch's KV cache when rows leave or join; the engine owns
scheduling, sampling, stop rules and text (the backends: docs/backends.md). A runner may also
offer position_logits(tokens): every position's logits [m, V], in consecutive chunks of m rows,
apart from any batch and cache; position_logits() below falls back to prefill and decode steps
where it does not. A runner that can continue a prompt's prefill also offers ChunkedPrefill (the
gguf one), so the engine spreads long prompts over several steps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int]

    @classmethod
    def of(cls, config: Any, configured_eos: int | list[int] | None, tokenizer: Any) -> ModelFacts:
        """From a transformers config, the generation config's EOS id(s) (else the tokenizer's)."""
        eos = configured_eos if configured_eos is not None else tokenizer.eos_token_id
        return cls(
            vocab_size=int(config.vocab_size),
            context_length=int(getattr(config, "max_position_embeddings", 0) or 2048),
            eos_token_ids=frozenset(
                int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None
            ),
        )


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    num_return_sequences: int
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    pad_token_id: int


class Runner(Protocol):
    """One model's forward passes. A batch state is opaque to the engine; rows are in order."""

    facts: ModelFacts
    backend: str

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any]:
        """(float32 CPU logits of each prompt's last position [N, V], a batch state of N rows)."""
        ...

    def decode(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (`tokens` [B]) and return the next logits [B, V]."""
        ...

    def select(self, state: Any, rows: Sequence[int]) -> Any:
        """A state of the given rows, in that order (a row may repeat)."""
        ...

    def merge(self, first: Any, second: Any) -> Any:
        """One state holding first's rows, then second's."""
        ...

    def beam_search(self, prompt_ids: Sequence[int], settings: BeamSettings) -> list[list[int]]:
        """The best num_return_sequences beams' new token ids, best first."""
        ...


def position_logits(runner: Runner, tokens: Sequence[int]) -> Iterator[torch.Tensor]:
    """The float32 logits after each of `tokens`, in consecutive chunks [m, V] (for prompt
    logprobs; a chunk at a time bounds the memory of a long prompt): the runner's own
    position_logits where it has one, else one prefill and a decode step per token."""
    own = getattr(runner, "position_logits", None)
    if own is not None:
        yield from own(tokens)
        return
    first, state = runner.prefill([list(tokens[:1])])
    yield first[:1]
    for token in tokens[1:]:
        yield runner.decode(state, torch.tensor([token], dtype=torch.long))[:1]


class ChunkedPrefill(Protocol):
    """Prompts prefilled a chunk at a time, into rows of a state apart from the running batch's;
    a finished row leaves through select() and joins the batch through merge()."""

    def cached_prefix(self, prompt: Sequence[int]) -> int | None:
        """How many leading tokens of `prompt` the prefix cache holds; None without a cache."""
        ...

    def open_rows(self, state: Any, prompts: Sequence[Sequence[int]]) -> tuple[Any, list[int]]:
        """Rows for `prompts` after those of `state` (None: a new state); (the state, the tokens
        each new row already holds from the prefix cache)."""
        ...

    def prefill_chunks(self, state: Any, pieces: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        """Each (row, prompt, count): the next `count` tokens of `prompt` in `row`; the float32
        logits after each piece's last token [pieces, V]."""
        ...
