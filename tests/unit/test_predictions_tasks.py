"""The predictions' tasks: input schemas and their field-naming violations, task inference from an
input, defaults merging, and the request each task sends."""

from __future__ import annotations

from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
import pytest
from inference.v1 import embedding_pb2, generation_pb2

from services.predictions.records import TASKS
from services.predictions.tasks import (
    TASK_SCHEMAS,
    InputError,
    build_request,
    infer_task,
    input_violations,
    merge_defaults,
    schema_problem,
)

VALID: dict[str, dict[str, Any]] = {
    "generate": {"prompt": "Hello", "parameters": {"max_new_tokens": 4, "temperature": 0}},
    "chat": {"messages": [{"role": "user", "content": "Hi"}], "parameters": {"max_new_tokens": 4}},
    "math": {"problem": "What is 12 * 7?"},
    "coding": {"problem": "Reverse a string", "language": "go"},
    "embed": {
        "input": ["a", "b"],
        "normalize": False,
        "dimensions": 8,
        "encoding_format": "ENCODING_FORMAT_FLOAT",
    },
}


def test_every_task_has_a_valid_draft_2020_12_schema() -> None:
    assert set(TASK_SCHEMAS) == set(TASKS)
    for schema in TASK_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False


@pytest.mark.parametrize("task", TASKS)
def test_a_valid_input_has_no_violation(task: str) -> None:
    assert input_violations(task, VALID[task], None) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "input", "field", "words"),
    [
        ("math", {}, "input.problem", "required"),
        ("chat", {"parameters": {}}, "input.messages", "required"),
        ("coding", {"language": "go"}, "input.problem", "required"),
        ("embed", {"normalize": True}, "input.input", "required"),
        ("generate", {"parameters": {}}, "input", "exactly one of 'prompt' and 'messages'"),
        ("generate", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "input", "exactly one"),
        ("generate", {"prompt": "a", "temperature": 1}, "input.temperature", "messages, parameters, prompt"),
        ("generate", {"prompt": 5}, "input.prompt", "not of type 'string'"),
        ("generate", {"prompt": "a", "parameters": 3}, "input.parameters", "not of type 'object'"),
        ("chat", {"messages": [{"role": "user"}]}, "input.messages[0].content", "required"),
        ("chat", {"messages": []}, "input.messages", "should be non-empty"),
        ("embed", {"input": "a", "dimensions": 0}, "input.dimensions", "less than the minimum"),
        ("embed", {"input": "a", "encoding_format": "float"}, "input.encoding_format", "is not one of"),
        ("generate", {"prompt": "a", "model": "x"}, "input.model", "set by the prediction"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "stream": True}, "input.stream", "set by"),
    ],
)
def test_schema_violations_name_the_field(task: str, input: dict[str, Any], field: str, words: str) -> None:
    violations = input_violations(task, input, None)  # type: ignore[arg-type]
    assert any(name == field and words in why for name, why in violations), violations


@pytest.mark.parametrize(
    ("input", "field", "words"),
    [
        ({"prompt": "a", "parameters": {"temperature": "hot"}}, "input.parameters.temperature", "hot"),
        ({"prompt": "a", "parameters": {"max_new_tokens": 1.5}}, "input.parameters.max_new_tokens", "1.5"),
        ({"prompt": "a", "parameters": {"warmth": 1}}, "input.parameters.warmth", "not a field"),
        ({"prompt": "a", "parameters": {"regex": "a", "grammar": "b"}}, "input.parameters", "constraint"),
    ],
)
def test_the_request_proto_checks_what_the_schema_leaves_open(
    input: dict[str, Any], field: str, words: str
) -> None:
    violations = input_violations("generate", input, None)
    assert len(violations) == 1, violations
    assert violations[0][0] == field and words in violations[0][1], violations


def test_a_deployment_schema_replaces_the_task_schema_but_not_the_proto_check() -> None:
    schema = {"type": "object", "properties": {"prompt": {"type": "string", "maxLength": 3}}}
    assert input_violations("generate", {"prompt": "toolong"}, schema) == [
        ("input.prompt", "'toolong' is too long")
    ]
    violations = input_violations("generate", {"prompt": "ok", "colour": "red"}, schema)
    assert violations == [("input.colour", "is not a field of this request")]


UNRESOLVABLE: list[dict[str, Any]] = [
    {"$ref": "#/$defs/nowhere"},
    {"type": "object", "properties": {"prompt": {"$ref": "#/$defs/nowhere"}}},
    {"type": "object", "properties": {"prompt": {"$ref": "https://schemas.example/prompt.json"}}},
]


@pytest.mark.parametrize("schema", UNRESOLVABLE)
def test_a_schema_with_an_unresolvable_ref_is_a_problem(schema: dict[str, Any]) -> None:
    jsonschema.validators.validator_for(schema).check_schema(schema)  # what let it through before
    problem = schema_problem(schema)
    assert problem is not None and "$ref" in problem


@pytest.mark.parametrize("schema", UNRESOLVABLE)
def test_an_unusable_stored_schema_is_a_violation_on_input_not_an_exception(schema: dict[str, Any]) -> None:
    violations = input_violations("generate", {"prompt": "hi"}, schema)
    assert [name for name, _ in violations] == ["input"] and "input_schema" in violations[0][1]


def test_schema_problem_follows_the_schemas_draft() -> None:
    resolvable = {
        "type": "object",
        "$defs": {"p": {"type": "string"}},
        "properties": {"prompt": {"$ref": "#/$defs/p"}},
    }
    assert schema_problem(resolvable) is None
    assert input_violations("generate", {"prompt": 1}, resolvable) == [
        ("input.prompt", "1 is not of type 'string'")
    ]
    # Draft 7's tuple "items" is refused by Draft 2020-12's metaschema but is Draft 7's own.
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "items": [{"type": "string"}],
    }
    assert schema_problem(draft7) is None
    assert input_violations("generate", {"prompt": "hi"}, draft7) == []
    unknown = schema_problem({"$schema": "https://schemas.example/mine", "type": "object"})
    assert unknown is not None and "$schema" in unknown
    assert schema_problem({"type": "object", "properties": {"prompt": {"pattern": "("}}}) is not None
    # A "$ref" inside a literal is data, not a reference.
    assert schema_problem({"enum": [{"$ref": "#/nowhere"}]}) is None


@pytest.mark.parametrize(
    ("input", "embedding", "task"),
    [
        ({"messages": []}, False, "chat"),
        ({"problem": "p", "language": "go"}, False, "coding"),
        ({"problem": "p"}, False, "math"),
        ({"prompt": "p"}, False, "generate"),
        ({"prompt": "p"}, True, "embed"),
        ({"input": "p"}, True, "embed"),
        ({"input": "p"}, False, None),
    ],
)
def test_infer_task(input: dict[str, Any], embedding: bool, task: str | None) -> None:
    assert infer_task(input, embedding) == task


def test_merge_defaults_is_one_level_deep_and_the_input_wins() -> None:
    defaults: dict[str, Any] = {"parameters": {"temperature": 0.5, "max_new_tokens": 8}, "language": "python"}
    input = {"problem": "p", "parameters": {"max_new_tokens": 2}, "language": "go"}
    merged = merge_defaults(defaults, input)
    assert merged == {
        "problem": "p",
        "parameters": {"temperature": 0.5, "max_new_tokens": 2},
        "language": "go",
    }
    merged["parameters"]["temperature"] = 1.0
    assert defaults["parameters"]["temperature"] == 0.5
    assert merge_defaults({"parameters": {"seed": 1}}, {"parameters": None}) == {"parameters": None}


def test_build_request_for_each_task() -> None:
    generate = build_request("generate", "m", VALID["generate"])
    assert isinstance(generate, generation_pb2.GenerateStreamRequest)
    assert (generate.model, generate.prompt, generate.parameters.max_new_tokens) == ("m", "Hello", 4)
    chat = build_request("chat", "m", VALID["chat"])
    assert isinstance(chat, generation_pb2.ChatRequest)
    assert chat.model == "m" and chat.messages[0].content == "Hi"
    math = build_request("math", "m", VALID["math"])
    assert isinstance(math, generation_pb2.SolveMathRequest) and math.problem == "What is 12 * 7?"
    coding = build_request("coding", "m", VALID["coding"])
    assert isinstance(coding, generation_pb2.SolveCodingRequest) and coding.language == "go"
    embed = build_request("embed", "e", VALID["embed"])
    assert isinstance(embed, embedding_pb2.EmbedRequest)
    assert embed.model == "e" and embed.dimensions == 8 and not embed.normalize
    assert [value.string_value for value in embed.input.list_value.values] == ["a", "b"]
    assert embed.encoding_format == embedding_pb2.ENCODING_FORMAT_FLOAT


def test_build_request_refuses_an_input_the_proto_cannot_carry() -> None:
    with pytest.raises(InputError) as caught:
        build_request("generate", "m", {"prompt": "a", "parameters": {"top_k": "many"}})
    assert caught.value.violations[0][0] == "input.parameters.top_k"


@pytest.mark.parametrize(
    ("parameters", "field", "words"),
    [
        ({"max_new_tokens": 100000}, "input.parameters.max_new_tokens", "between 1 and 4096"),
        ({"max_tokens": 0}, "input.parameters.max_tokens", "between 1 and 4096"),
        ({"temperature": -1}, "input.parameters.temperature", "[0, 100]"),
        ({"top_p": 0}, "input.parameters.top_p", "(0, 1]"),
    ],
)
def test_an_out_of_range_knob_is_a_violation_at_create(
    parameters: dict[str, Any], field: str, words: str
) -> None:
    problems = dict(input_violations("generate", {"prompt": "Hi", "parameters": parameters}, None))
    assert field in problems, problems
    assert words in problems[field]


def test_knobs_in_range_and_an_embedding_input_have_no_sampling_violation() -> None:
    assert (
        input_violations(
            "chat",
            {"messages": [{"role": "user", "content": "Hi"}], "parameters": {"max_new_tokens": 8}},
            None,
        )
        == []
    )
    assert input_violations("embed", {"input": "a text"}, None) == []
