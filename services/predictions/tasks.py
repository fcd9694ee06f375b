"""The tasks a prediction runs: each task's input schema, how a served model's task is inferred
from the input, how a deployment's defaults merge under an input, the input's checks (JSON
Schema, then the task's request proto) and the request the runner sends to the gateway."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
import referencing.exceptions
from google.protobuf import json_format
from google.protobuf.message import Message
from inference.v1 import embedding_pb2, generation_pb2

from services.common import sampling
from services.predictions.records import Task

_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "description": "Sampling parameters (SamplingParameters): their fields and ranges are checked at create.",
}
_MESSAGES: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
        "required": ["role", "content"],
        "additionalProperties": False,
    },
}
_TEXT: dict[str, Any] = {"type": "string", "minLength": 1}
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _object(properties: dict[str, Any], required: list[str], **more: Any) -> dict[str, Any]:
    return {
        "$schema": _DRAFT,
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        **more,
    }


TASK_SCHEMAS: dict[Task, dict[str, Any]] = {
    "generate": _object(
        {"prompt": _TEXT, "messages": _MESSAGES, "parameters": _PARAMETERS},
        [],
        oneOf=[{"required": ["prompt"]}, {"required": ["messages"]}],
    ),
    "chat": _object(
        {
            "messages": _MESSAGES,
            "tools": {"type": "array", "items": {"type": "object"}},
            "parameters": _PARAMETERS,
        },
        ["messages"],
    ),
    "math": _object({"problem": _TEXT, "parameters": _PARAMETERS}, ["problem"]),
    "coding": _object(
        {"problem": _TEXT, "language": {"type": "string"}, "parameters": _PARAMETERS}, ["problem"]
    ),
    "embed": _object(
        {
            "input": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "anyOf": [
                                {"type": "string"},
                                {"type": "integer", "minimum": 0},
                                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            ]
                        },
                    },
                ]
            },
            "normalize": {"type": "boolean"},
            "dimensions": {"type": "integer", "minimum": 1},
            "encoding_format": {
                "enum": [
                    "ENCODING_FORMAT_UNSPECIFIED",
                    "ENCODING_FORMAT_FLOAT",
                    "ENCODING_FORMAT_BASE64",
                    0,
                    1,
                    2,
                ]
            },
            "truncate": {"type": "boolean"},
        },
        ["input"],
    ),
}

# The request each task sends: the streaming RPC's request for text tasks, Embed's for embed.
REQUEST_TYPES: dict[Task, type[Message]] = {
    "generate": generation_pb2.GenerateStreamRequest,
    "chat": generation_pb2.ChatRequest,
    "math": generation_pb2.SolveMathRequest,
    "coding": generation_pb2.SolveCodingRequest,
    "embed": embedding_pb2.EmbedRequest,
}

# Set by the prediction itself, never by its input.
_RESERVED = ("model", "stream")


class InputError(ValueError):
    """An input the task's request cannot carry; `violations` name each field and why."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{name}: {why}" for name, why in violations))
        self.violations = violations


def infer_task(input: dict[str, Any], embedding_model: bool) -> Task | None:
    """The task a served model runs for `input`; None when the input names none."""
    if embedding_model:
        return "embed"
    if "messages" in input:
        return "chat"
    if "problem" in input:
        return "coding" if "language" in input else "math"
    if "prompt" in input:
        return "generate"
    return None


def merge_defaults(defaults: dict[str, Any], input: dict[str, Any]) -> dict[str, Any]:
    """`input` over `defaults`, one level deep: nested objects (e.g. "parameters") merge key by
    key, and the input wins everywhere."""
    merged = copy.deepcopy(defaults)
    for key, value in input.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict):
            merged[key] = {**base, **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _path(parts: Any) -> str:
    path = "input"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _schema_violations(error: jsonschema.ValidationError) -> list[tuple[str, str]]:
    parts = list(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        missing = [name for name in error.validator_value if name not in instance]
        named = next((name for name in missing if repr(name) in error.message), None)
        if named is not None:
            return [(_path([*parts, named]), "is required")]
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = sorted(error.schema.get("properties", {}))
        extra = [name for name in instance if name not in known]
        if extra:
            allowed = ", ".join(known) or "nothing"
            return [
                (_path([*parts, name]), f"is not a field of this input (it takes: {allowed})")
                for name in extra
            ]
    if error.validator == "oneOf" and all(
        isinstance(branch, dict) and list(branch) == ["required"] for branch in error.validator_value
    ):
        names = " and ".join(repr(name) for branch in error.validator_value for name in branch["required"])
        return [(_path(parts), f"exactly one of {names} is required")]
    return [(_path(parts), error.message)]


_NO_FIELD = re.compile(r'has no field named "([^"]+)" at "[^".]+\.?([^"]*)"')
_AT = re.compile(r" at [A-Za-z_]\w*\.([\w.\[\]]+)\.?$")
_STEP = re.compile(r"^Failed to parse (\w+) field: ")


def _parse_violation(message: str) -> tuple[str, str]:
    """Maps a json_format.ParseError message to (field path, reason)."""
    first = message.split("\n", 1)[0].rstrip(".")
    unknown = _NO_FIELD.search(first)
    if unknown:
        prefix = unknown.group(2)
        path = _path([prefix, unknown.group(1)] if prefix else [unknown.group(1)])
        return path, "is not a field of this request"
    steps: list[str] = []
    rest = first
    while (step := _STEP.match(rest)) is not None:
        steps.append(step.group(1))
        rest = rest[step.end() :]
    at = _AT.search(rest)
    if at:
        return "input." + at.group(1), rest[: at.start()]
    return (_path(steps), rest) if steps else ("input", rest)


def _parse(task: Task, input: dict[str, Any]) -> Message:
    request = REQUEST_TYPES[task]()
    try:
        json_format.ParseDict(input, request, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        raise InputError([_parse_violation(str(error))]) from error
    return request


# What applying a schema can raise besides its verdict: a $ref that resolves nowhere, a keyword
# value check_schema let through, a pattern Python's re refuses.
_SCHEMA_FAILURES = (referencing.exceptions.Unresolvable, jsonschema.SchemaError, re.error)


def _validator_class(schema: dict[str, Any]) -> Any:
    """The validator of the draft `schema` names in $schema (Draft 2020-12 without one); raises
    SchemaError for a $schema this library does not know."""
    draft = schema.get("$schema")
    if draft is None:
        return jsonschema.Draft202012Validator
    found = jsonschema.validators.validator_for(schema, default=None) if isinstance(draft, str) else None
    if found is None:
        raise jsonschema.SchemaError(f"$schema {draft!r} is not a JSON Schema draft this service knows")
    return found


def _refs(node: Any, root: bool = True) -> list[str]:
    """Every $ref in a schema, except under a nested $id (whose refs resolve against another base)
    and inside literal values (enum, const, default, examples)."""
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item, False)]
    if not isinstance(node, dict) or (not root and "$id" in node):
        return []
    found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    for key, value in node.items():
        if key not in ("enum", "const", "default", "examples"):
            found.extend(_refs(value, False))
    return found


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` cannot check inputs (not a schema of its draft, a $ref that resolves nowhere,
    a bad pattern); None when it can."""
    try:
        validator_class = _validator_class(schema)
        validator_class.check_schema(schema)
        validator = validator_class(schema)
        # A probe instance reaches a top-level $ref; each other $ref is looked up on its own.
        validator.is_valid({})
        for ref in _refs(schema):
            validator.evolve(schema={"$ref": ref}).is_valid(None)
    except jsonschema.SchemaError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        return f"not a valid JSON Schema{f' at {where}' if where else ''}: {error.message}"
    except referencing.exceptions.Unresolvable as error:
        return f"has a $ref that resolves nowhere: {error}"
    except re.error as error:
        return f"has a pattern that is not a regular expression: {error}"
    return None


# The tasks' own schemas are fixed: their validators are built once, not on every create.
_TASK_VALIDATORS = {task: jsonschema.Draft202012Validator(schema) for task, schema in TASK_SCHEMAS.items()}


def input_violations(
    task: Task, input: dict[str, Any], schema: dict[str, Any] | None
) -> list[tuple[str, str]]:
    """Every problem of `input` for `task` as (field path, reason): the JSON Schema's (the
    deployment's `schema`, else the task's own), then what the task's request proto refuses. A
    schema that cannot be applied is one violation on "input", never an exception."""
    violations = [
        (f"input.{name}", "is set by the prediction, not its input") for name in _RESERVED if name in input
    ]
    named = {name for name, _ in violations}
    try:
        checker = _TASK_VALIDATORS[task] if schema is None else _validator_class(schema)(schema)
        errors = sorted(checker.iter_errors(input), key=lambda e: [str(p) for p in e.absolute_path])
    except _SCHEMA_FAILURES as unusable:
        return [("input", f"cannot be checked: the deployment's input_schema is unusable ({unusable})")]
    for error in errors:
        violations.extend(v for v in _schema_violations(error) if v[0] not in named)
    named = {name for name, _ in violations}
    if not any(name in input for name in _RESERVED):
        try:
            request = _parse(task, input)
        except InputError as error:
            violations.extend(v for v in error.violations if v[0] not in named)
        else:
            violations.extend(_sampling_violations(request))
    return violations


def _sampling_violations(request: Message) -> list[tuple[str, str]]:
    """The knobs' own checks at the default limits, so that an out-of-range knob is a 400 at
    create rather than a prediction that fails when it runs (a gateway configured with higher
    limits is stricter here than there)."""
    if "parameters" not in request.DESCRIPTOR.fields_by_name or not request.HasField("parameters"):
        return []
    parameters = request.parameters  # type: ignore[attr-defined]
    return [(f"input.{path}", problem) for path, problem in sampling.violations(parameters)]


def build_request(task: Task, served_model: str, effective_input: dict[str, Any]) -> Message:
    """The request the runner sends for `task`, with `served_model` as its model; raises
    InputError when the input does not fit the request."""
    request = _parse(task, {k: v for k, v in effective_input.items() if k not in _RESERVED})
    request.model = served_model  # type: ignore[attr-defined]
    return request
