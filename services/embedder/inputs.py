"""Request input validation: OpenAI's four shapes of `input` (a string, a list of strings, a list of token
ids, a list of token-id lists) from the Python form of a google.protobuf.Value; ids must be whole numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.embedder.exceptions import InvalidInput

SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


@dataclass(frozen=True)
class ParsedInput:
    """Either texts or token-id lists (never both), with the request field of each item."""

    texts: list[str] | None
    token_ids: list[list[int]] | None
    fields: list[str]

    def __len__(self) -> int:
        return len(self.fields)


def _token_id(value: Any, field: str) -> int:
    # bool is an int subclass in Python, but true/false are not token ids.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, f"must be a token id (a whole number), got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidInput(field, f"must be a whole number, got {value}")
    if value < 0:
        raise InvalidInput(field, f"must be a non-negative token id, got {int(value)}")
    return int(value)


def _token_list(values: list[Any], field: str) -> list[int]:
    if not values:
        raise InvalidInput(field, "must not be an empty list of token ids")
    return [_token_id(value, f"{field}[{index}]") for index, value in enumerate(values)]


def parse_input(value: Any, max_inputs: int, max_chars: int) -> ParsedInput:
    """Validate `input`; raises InvalidInput naming the field and the limit."""
    if value is None:
        raise InvalidInput("input", f"is required: {SHAPES}")
    if isinstance(value, str):
        _check_text(value, "input", max_chars)
        return ParsedInput(texts=[value], token_ids=None, fields=["input"])
    if not isinstance(value, list):
        raise InvalidInput("input", f"must be {SHAPES}; got {type(value).__name__}")
    if not value:
        raise InvalidInput("input", "must not be an empty list")
    first = value[0]
    if isinstance(first, str):
        if len(value) > max_inputs:
            raise InvalidInput("input", f"has {len(value)} items; at most {max_inputs} are allowed")
        texts: list[str] = []
        for index, item in enumerate(value):
            field = f"input[{index}]"
            if not isinstance(item, str):
                raise InvalidInput(field, f"must be a string like input[0], got {type(item).__name__}")
            _check_text(item, field, max_chars)
            texts.append(item)
        return ParsedInput(texts=texts, token_ids=None, fields=[f"input[{i}]" for i in range(len(texts))])
    if isinstance(first, list):
        if len(value) > max_inputs:
            raise InvalidInput("input", f"has {len(value)} items; at most {max_inputs} are allowed")
        lists: list[list[int]] = []
        for index, item in enumerate(value):
            field = f"input[{index}]"
            if not isinstance(item, list):
                raise InvalidInput(
                    field, f"must be a list of token ids like input[0], got {type(item).__name__}"
                )
            lists.append(_token_list(item, field))
        return ParsedInput(texts=None, token_ids=lists, fields=[f"input[{i}]" for i in range(len(lists))])
    if isinstance(first, int | float) and not isinstance(first, bool):
        return ParsedInput(texts=None, token_ids=[_token_list(value, "input")], fields=["input"])
    raise InvalidInput(
        "input[0]", f"must be a string, a token id or a list of token ids; input must be {SHAPES}"
    )


def _check_text(text: str, field: str, max_chars: int) -> None:
    if not text:
        raise InvalidInput(field, "must not be an empty string")
    if len(text) > max_chars:
        raise InvalidInput(field, f"has {len(text)} characters; at most {max_chars} are allowed")
