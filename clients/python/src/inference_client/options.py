"""Keyword options of the generation calls, as TypedDicts: mypy checks every keyword name and
type at the call site, and the sync and asyncio clients share one definition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypedDict


class SchemaModel(Protocol):
    """A class that gives its JSON Schema and validates JSON text into an instance (a pydantic
    model, duck-typed: the client does not depend on pydantic)."""

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]: ...

    @classmethod
    def model_validate_json(cls, json_data: str) -> Any: ...


JsonSchema = Mapping[str, Any] | type[SchemaModel]
"""A JSON Schema as a dict, or a model class whose schema it is."""

CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
"""The output constraints; a request takes at most one."""


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
    json_schema: JsonSchema
    """The output is JSON valid against this schema; the reply's `parsed` is the parsed object,
    or an instance of the model class given here. At most one of these five constraints."""
    json_object: bool
    """The output is a JSON object (any); `parsed` is the parsed dict."""
    regex: str
    """The output matches this regular expression."""
    choice: Sequence[str]
    """The output is exactly one of these strings."""
    grammar: str
    """The output follows this Lark grammar (llguidance's dialect)."""


class GenerateOptions(ChatOptions, total=False):
    num_return_sequences: int
    num_beams: int
    prompt_logprobs: bool
    """Return the prompt's tokens with their logprobs (unary calls: Generation.prompt_tokens)."""
