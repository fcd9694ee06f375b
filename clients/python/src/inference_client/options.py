"""Keyword options of the generation calls, as TypedDicts: mypy checks every keyword name and
type at the call site, and the sync and asyncio clients share one definition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict


class ChatOptions(TypedDict, total=False):
    """Sampling knobs, sent as the request's `parameters`; a knob left out means the server's
    default (greedy decoding unless temperature above 0, top_p or top_k is set)."""

    model: str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    do_sample: bool
    stop: str | Sequence[str]
    """Generation stops before any of these strings and omits it."""
    seed: int
    """The same seed gives the same sampled text."""
    logprobs: bool
    """Return each token with its logprob (the sampler's distribution before top_k/top_p)."""
    top_logprobs: int
    """Also return this many (0-20) most likely tokens at each position."""
    presence_penalty: float
    """In [-2, 2]: subtracted once from every token the sequence has generated (OpenAI's)."""
    frequency_penalty: float
    """In [-2, 2]: subtracted once per time the sequence has generated a token (OpenAI's)."""
    logit_bias: Mapping[int, float]
    """Token id to a value in [-100, 100] added to its logit; at most 300 entries."""


class GenerateOptions(ChatOptions, total=False):
    num_return_sequences: int
    num_beams: int
    prompt_logprobs: bool
    """Return the prompt's tokens with their logprobs (unary calls: Generation.prompt_tokens)."""
