"""Property-based fuzzing of the gateway's request checks (and the predictions tier's input checks):
every request message, built field by field from its proto descriptor with extreme numbers, NaN,
infinities, huge and empty strings, unicode and nested JSON, is either accepted (and converts to
the native request without error) or refused with INVALID_ARGUMENT whose BadRequest names a field
of the request; never another exception. Deterministic: derandomized, bounded examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import grpc
import pytest
from google.protobuf import descriptor, json_format, message_factory, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, openai_pb2

from services.common import sampling
from services.common.errors import RpcFailure, not_found, wire_bytes
from services.gateway import openai_compat as oai
from services.gateway import validation
from services.gateway.validation import RequestLimits
from services.predictions import tasks
from services.predictions.records import Task

FD = descriptor.FieldDescriptor
# What a refusal's trailers may take (grpc-message percent-encoded, grpc-status-details-bin in
# base64): well under gRPC's default 8 KiB of metadata and its 16 KiB hard limit.
STATUS_BYTES = 6 * 1024
LIMITS = RequestLimits()
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Words the checks look for, so that generated requests get past the first refusal often.
WORDS = [
    *validation.OPENAI_ROLES,
    "text",
    "json_object",
    "json_schema",
    "function",
    "object",
    "string",
    "auto",
    "none",
    "required",
    "float",
    "base64",
    "python",
    "name",
    "type",
    "properties",
    "parameters",
    "$ref",
    "#",
    "#/properties",
    "",
    " ",
    "\x00",
    "é🙂\u202e",
]
EXTREME_FLOATS = [0.0, -0.0, 1e-320, 2.0, 5e-324, 1e308, -1e308, math.inf, -math.inf, math.nan, 3.4e38]


def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Short unicode text, the checks' own words, and now and then one over every length limit."""
    # Every category but surrogates, which are not UTF-8 (protobuf refuses them).
    characters = st.characters(categories=("L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co", "Cn"))
    plain = st.text(characters, max_size=max_size)
    huge = st.sampled_from(
        ["x" * (LIMITS.max_prompt_chars + 1), " " * 70_000, "é" * 300, "é" * 400, "🙂" * 2000, "%\x01" * 500]
    )
    return st.one_of(st.sampled_from(WORDS), plain, huge)


def numbers(width: Literal[32, 64] = 64) -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from(EXTREME_FLOATS),
        st.floats(width=width),
        st.floats(0, 2, width=width),
        st.integers(-5, 70_000).map(float),
    )


JSON: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers(), texts(12)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(texts(8), inner, max_size=4),
    ),
    max_leaves=12,
)

# JSON shaped as the polymorphic fields expect, with bad values inside.
SHAPED_JSON: st.SearchStrategy[Any] = st.one_of(
    JSON,
    st.lists(numbers(), max_size=5),
    st.lists(st.lists(numbers(), max_size=3), max_size=3),
    st.lists(texts(), max_size=5),
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": JSON}), max_size=3
    ),
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": JSON})}),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["object", "string"]),
            "properties": st.dictionaries(texts(8), JSON, max_size=3),
        }
    ),
)


def _to_value(data: Any, value: struct_pb2.Value) -> None:
    """`data` into a Value, NaN and infinities included (a gRPC client can send them)."""
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, (int, float)):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.list_value.SetInParent()
        for item in data:
            _to_value(item, value.list_value.values.add())
    else:
        value.struct_value.SetInParent()
        for key, item in data.items():
            _to_value(item, value.struct_value.fields[key])


def to_struct(data: dict[str, Any], struct: struct_pb2.Struct) -> None:
    """`data` into `struct`, NaN and infinities included."""
    holder = struct_pb2.Value()
    _to_value(data, holder)
    struct.CopyFrom(holder.struct_value)


def _struct(data: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    to_struct(data if isinstance(data, dict) else {"value": data}, struct)
    return struct


_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        edges = [low, high, 0, 1, -1 if low < 0 else 2, 2**31 - 1 if high > 2**31 else high]
        small = st.integers(max(low, -2), 8)
        return st.one_of(st.sampled_from(edges), small, st.integers(max(low, -10), min(high, 100_000)))
    if field.type == FD.TYPE_FLOAT:
        return numbers(width=32)
    if field.type == FD.TYPE_DOUBLE:
        return numbers()
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_STRING:
        return texts()
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=20)
    if field.type == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 99))
    raise AssertionError(f"unhandled field type {field.type} of {field.full_name}")


def _value_of(field: Any, depth: int) -> st.SearchStrategy[Any]:
    """What one element of `field` holds: a scalar, JSON for the well-known types, or a message."""
    if field.type != FD.TYPE_MESSAGE:
        return _scalar(field)
    name = field.message_type.full_name
    if name == "google.protobuf.Value":
        return SHAPED_JSON
    if name == "google.protobuf.Struct":
        return SHAPED_JSON.map(_struct)
    if name == "google.protobuf.ListValue":
        return st.lists(JSON, max_size=4)
    return messages(field.message_type, depth + 1)


def _set(message: Message, field: Any, data: Any) -> None:
    name = field.name
    message_type = field.message_type.full_name if field.type == FD.TYPE_MESSAGE else ""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        mapping = getattr(message, name)
        value_field = field.message_type.fields_by_name["value"]
        for key, item in data.items():
            if value_field.type == FD.TYPE_MESSAGE:
                mapping[key].CopyFrom(item)
            else:
                mapping[key] = item
        return
    if field.is_repeated:
        target = getattr(message, name)
        for item in data:
            if message_type == "google.protobuf.Value":
                _to_value(item, target.add())
            elif field.type == FD.TYPE_MESSAGE:
                target.add().CopyFrom(item)
            else:
                target.append(item)
        return
    if message_type == "google.protobuf.Value":
        _to_value(data, getattr(message, name))
    elif message_type == "google.protobuf.ListValue":
        holder = struct_pb2.Value()
        _to_value(data, holder)
        getattr(message, name).CopyFrom(holder.list_value)
    elif field.type == FD.TYPE_MESSAGE:
        getattr(message, name).CopyFrom(data)
    else:
        setattr(message, name, data)


def _field(field: Any, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = _scalar(field.message_type.fields_by_name["key"])
        return st.dictionaries(key, _value_of(field.message_type.fields_by_name["value"], depth), max_size=4)
    one = _value_of(field, depth)
    if field.is_repeated:
        return st.lists(one, max_size=4)
    return one


def messages(message_type: Any, depth: int = 0, percent: int = 50) -> st.SearchStrategy[Any]:
    """Messages of `message_type` with any subset of fields (each set with `percent` chance)
    set to anything their type allows."""
    if depth > 4:
        return st.just(message_factory.GetMessageClass(message_type)())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message: Message = message_factory.GetMessageClass(message_type)()
        for field in message_type.fields:
            if draw(st.integers(0, 99)) < percent:
                _set(message, field, draw(_field(field, depth)))
        return message

    return build()


def fuzzed(base: Message) -> st.SearchStrategy[Any]:
    """Anything of `base`'s type, or `base` (a valid request) with a few fields changed, so that
    the checks after the first refusal and the conversions of accepted requests run too."""

    def merged(change: Message) -> Message:
        result = type(base)()
        result.CopyFrom(base)
        result.MergeFrom(change)
        return result

    return st.one_of(messages(base.DESCRIPTOR), messages(base.DESCRIPTOR, percent=10).map(merged))


def _field_names(message_type: Any) -> set[str]:
    return {name for field in message_type.fields for name in (field.name, field.json_name)}


def _violations(error: RpcFailure) -> list[str]:
    return [
        violation.field
        for detail in error.details
        if isinstance(detail, error_details_pb2.BadRequest)
        for violation in detail.field_violations
    ]


def outcome(request: Message, check: Callable[[], object]) -> object | None:
    """Runs `check`: its result when accepted, None when refused with INVALID_ARGUMENT whose
    violations each name a field of `request`; any other exception fails the test."""
    try:
        return check()
    except RpcFailure as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        # The status travels in HTTP/2 trailers, which Envoy and gRPC clients limit.
        assert wire_bytes(error.to_status()) <= STATUS_BYTES, len(error.message)
        fields = _violations(error)
        assert fields, f"no field violation in {error}"
        known = _field_names(request.DESCRIPTOR)
        for name in fields:
            root = name.split(".", 1)[0].split("[", 1)[0]
            assert root in known, f"{name!r} names no field of {request.DESCRIPTOR.name}: {error}"
        return None


USER = [common_pb2.ChatMessage(role="user", content="hi")]
PARAMETERS = common_pb2.SamplingParameters(max_new_tokens=8)
TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}},
}


GENERATE = generation_pb2.GenerateRequest(prompt="hi", parameters=PARAMETERS)
GENERATE_STREAM = generation_pb2.GenerateStreamRequest(messages=USER, stream=True)
CHAT = json_format.ParseDict(
    {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}, generation_pb2.ChatRequest()
)
EMBED = json_format.ParseDict({"input": ["hi", "there"]}, embedding_pb2.EmbedRequest())


@FUZZ
@given(fuzzed(GENERATE))
def test_generate_requests(request: generation_pb2.GenerateRequest) -> None:
    outcome(request, lambda: validation.validate_generate(request, LIMITS))


@FUZZ
@given(fuzzed(GENERATE_STREAM))
def test_generate_stream_requests(request: generation_pb2.GenerateStreamRequest) -> None:
    outcome(request, lambda: validation.validate_generate(request, LIMITS))


@FUZZ
@given(fuzzed(CHAT))
def test_chat_requests(request: generation_pb2.ChatRequest) -> None:
    outcome(request, lambda: validation.validate_chat(request, LIMITS))


@FUZZ
@given(
    st.one_of(
        fuzzed(generation_pb2.SolveMathRequest(problem="1+1")),
        fuzzed(generation_pb2.SolveCodingRequest(problem="sort", language="python")),
    )
)
def test_solve_requests(request: generation_pb2.SolveMathRequest | generation_pb2.SolveCodingRequest) -> None:
    outcome(request, lambda: validation.validate_solve(request, LIMITS))


@FUZZ
@given(fuzzed(EMBED))
def test_embed_requests(request: embedding_pb2.EmbedRequest) -> None:
    outcome(request, lambda: validation.validate_embed(request, LIMITS))


@FUZZ
@given(
    st.one_of(
        messages(embedding_pb2.PreloadModelsRequest.DESCRIPTOR),
        messages(embedding_pb2.ClearCacheRequest.DESCRIPTOR),
        messages(embedding_pb2.GetModelCounterRequest.DESCRIPTOR),
    )
)
def test_model_name_requests(request: Message) -> None:
    if isinstance(request, embedding_pb2.GetModelCounterRequest):
        outcome(request, lambda: validation.validate_model_names([request.model], "model"))
    else:
        outcome(request, lambda: validation.validate_model_names(request.models, "models"))  # type: ignore[attr-defined]


def _chat_completion(request: openai_pb2.CreateChatCompletionRequest) -> object:
    """The servicer's path up to the backend call: the checks, then the native request."""
    plan = validation.validate_chat_completion(request, LIMITS)
    oai.constraint_source(request, plan.tools)
    oai.ChatChunker("model", request.stream_options.include_usage, oai.wants_logprobs(request), plan.tools)
    if plan.tools.templated:
        native: Message = oai.chat_request(request, plan, "model")
    else:
        native = generation_pb2.GenerateRequest(**oai.chat_fields(request, plan, "model"))
    # What the gateway accepts, the generator's own checks of the same knobs accept too.
    parameters = native.parameters  # type: ignore[attr-defined]
    assert sampling.violations(parameters, LIMITS.openai_sampling) == [], parameters
    return native


CHAT_COMPLETION = openai_pb2.CreateChatCompletionRequest(
    model="m",
    messages=[openai_pb2.ChatCompletionMessage(role="user", content=struct_pb2.Value(string_value="hi"))],
)


@FUZZ
@given(
    st.one_of(
        fuzzed(CHAT_COMPLETION),
        fuzzed(
            json_format.ParseDict(
                {"tools": [TOOL], "tool_choice": "required"},
                openai_pb2.CreateChatCompletionRequest(model="m", messages=CHAT_COMPLETION.messages),
            )
        ),
    )
)
def test_chat_completion_requests(request: openai_pb2.CreateChatCompletionRequest) -> None:
    outcome(request, lambda: _chat_completion(request))


def _completion(request: openai_pb2.CreateCompletionRequest) -> object:
    prompts = validation.validate_completion(request, LIMITS)
    oai.constraint_source(request)
    natives = [generation_pb2.GenerateRequest(**oai.completion_fields(request, p, "model")) for p in prompts]
    for native in natives:
        assert sampling.violations(native.parameters, LIMITS.openai_sampling) == [], native.parameters
    return natives


COMPLETION = openai_pb2.CreateCompletionRequest(model="m", prompt=struct_pb2.Value(string_value="hi"))


@FUZZ
@given(fuzzed(COMPLETION))
def test_completion_requests(request: openai_pb2.CreateCompletionRequest) -> None:
    outcome(request, lambda: _completion(request))


def _openai_embedding(request: openai_pb2.CreateEmbeddingRequest) -> object:
    validation.validate_openai_embedding(request, LIMITS)
    native = oai.embedding_request(request, "model")
    validation.validate_embed(native, LIMITS)
    return native


OPENAI_EMBEDDING = openai_pb2.CreateEmbeddingRequest(model="m", input=struct_pb2.Value(string_value="hi"))


@FUZZ
@given(fuzzed(OPENAI_EMBEDDING))
def test_openai_embedding_requests(request: openai_pb2.CreateEmbeddingRequest) -> None:
    outcome(request, lambda: _openai_embedding(request))


PREDICTION_BASES: dict[str, dict[str, Any]] = {
    "generate": {"prompt": "hi"},
    "chat": {"messages": [{"role": "user", "content": "hi"}]},
    "math": {"problem": "1+1"},
    "coding": {"problem": "sort", "language": "python"},
    "embed": {"input": "hi"},
}
KNOBS = st.sampled_from(sorted(common_pb2.SamplingParameters.DESCRIPTOR.fields_by_name))


@st.composite
def prediction_inputs(draw: st.DrawFn) -> tuple[Task, dict[str, Any]]:
    """A task and its input: a valid one with keys changed, sampling knobs set to any JSON."""
    task: Task = draw(st.sampled_from(sorted(tasks.REQUEST_TYPES)))
    fields = sorted(tasks.REQUEST_TYPES[task].DESCRIPTOR.fields_by_name)
    input = dict(PREDICTION_BASES[task]) if draw(st.booleans()) else {}
    input.update(draw(st.dictionaries(st.one_of(st.sampled_from(fields), texts(8)), SHAPED_JSON, max_size=3)))
    if draw(st.booleans()):
        input["parameters"] = draw(st.dictionaries(KNOBS, SHAPED_JSON, max_size=3))
    return task, input


@FUZZ
@given(prediction_inputs())
def test_prediction_inputs(case: tuple[Task, dict[str, Any]]) -> None:
    """A prediction's input is refused with (field, reason) pairs on "input...", or builds the
    request the runner sends."""
    task, input = case
    problems = tasks.input_violations(task, input, None)
    assert all(name == "input" or name.startswith(("input.", "input[")) for name, _ in problems), problems
    if not problems:
        tasks.build_request(task, "model", input)


@FUZZ
@given(st.sampled_from(sorted(tasks.REQUEST_TYPES)), st.dictionaries(texts(8), SHAPED_JSON, max_size=4), JSON)
def test_deployment_schemas(task: Task, schema: dict[str, Any], input: Any) -> None:
    """A deployment's input_schema is a problem or usable: applying it never raises."""
    if tasks.schema_problem(schema) is None and isinstance(input, dict):
        tasks.input_violations(task, input, schema)


# Regressions: the minimal inputs the properties above found.


def _refusal(check: Callable[[], object]) -> list[tuple[str, str]]:
    with pytest.raises(RpcFailure) as caught:
        check()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return [
        (violation.field, violation.description)
        for detail in caught.value.details
        if isinstance(detail, error_details_pb2.BadRequest)
        for violation in detail.field_violations
    ]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_json_schema_is_refused_by_name(bad: float) -> None:
    """json_format cannot print NaN or infinities: a schema holding one was an INTERNAL error."""
    request = generation_pb2.GenerateRequest(prompt="hi")
    request.parameters.json_schema.update({"type": "object"})
    request.parameters.json_schema.fields["maximum"].number_value = bad
    refused = _refusal(lambda: validation.validate_generate(request, LIMITS))
    assert refused == [("parameters.json_schema.maximum", sampling.NON_FINITE)]


def test_non_finite_choice_is_refused_where_every_tier_checks() -> None:
    """The shared sampling checks (generator, predictions) name it too, rather than raise."""
    parameters = common_pb2.SamplingParameters()
    parameters.choice.values.add().number_value = math.nan
    assert sampling.violations(parameters) == [("parameters.choice[0]", sampling.NON_FINITE)]


def test_non_finite_tool_parameters_are_refused_by_name() -> None:
    request = json_format.ParseDict(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}, generation_pb2.ChatRequest()
    )
    request.tools[0].fields["function"].struct_value.fields["parameters"].struct_value.fields[
        "minimum"
    ].number_value = -math.inf
    refused = _refusal(lambda: validation.validate_chat(request, LIMITS))
    assert refused == [("tools[0].function.parameters.minimum", sampling.NON_FINITE)]


def test_non_finite_openai_fields_are_refused_by_name() -> None:
    request = openai_pb2.CreateChatCompletionRequest()
    request.CopyFrom(CHAT_COMPLETION)
    request.response_format.type = "json_schema"
    request.response_format.json_schema.schema.fields["maxItems"].number_value = math.inf
    json_format.ParseDict(TOOL, request.tools.add())
    request.tools[0].function.parameters.fields["x"].list_value.values.add().number_value = math.nan
    refused = _refusal(lambda: validation.validate_chat_completion(request, LIMITS))
    assert [name for name, _ in refused] == [
        "response_format.json_schema.schema.maxItems",
        "tools[0].function.parameters.x[0]",
    ]


def test_a_refusal_quoting_a_huge_value_stays_small() -> None:
    """Regression (fuzzing over gRPC): a role of 100 001 characters was quoted whole in the
    status, whose trailers Envoy then refused (a 503 "protocol error")."""
    huge = "x" * (LIMITS.max_prompt_chars + 1)
    request = generation_pb2.ChatRequest(
        messages=[common_pb2.ChatMessage(role=huge, content=huge) for _ in range(20)]
    )
    with pytest.raises(RpcFailure) as caught:
        validation.validate_chat(request, LIMITS)
    assert wire_bytes(caught.value.to_status()) <= STATUS_BYTES
    assert caught.value.message.startswith("messages[0].role: must be one of")
    assert caught.value.message.endswith("more")
    assert _violations(caught.value)[:2] == ["messages[0].role", "messages[0].content"]
    refused = not_found("model", huge, ["m"])
    assert wire_bytes(refused.to_status()) <= STATUS_BYTES


@pytest.mark.parametrize(
    "text", ["é" * 400, "🙂" * 400, "\u202e%" * 400], ids=["accents", "emoji", "escaped"]
)
def test_a_refusal_quoting_non_ascii_values_stays_small_on_the_wire(text: str) -> None:
    """Regression: clipped by characters, 8 roles of "é" * 400 made about 18 KB of trailers
    (percent-encoded message and base64 details), past gRPC's 16 KiB: clients got
    RESOURCE_EXHAUSTED (a REST 429 with Retry-After) instead of the refusal."""
    request = generation_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role=text, content="hi")] * 8)
    with pytest.raises(RpcFailure) as caught:
        validation.validate_chat(request, LIMITS)
    failure = caught.value
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert wire_bytes(failure.to_status()) <= STATUS_BYTES
    assert failure.message.startswith("messages[0].role: must be one of")
    assert failure.message.endswith("more")
    assert _violations(failure)[0] == "messages[0].role"
    # Clipped on a character's boundary: the text is still valid UTF-8 that protobuf accepts.
    failure.to_status().SerializeToString()
    refused = not_found("model", text * 10, ["m"])
    assert wire_bytes(refused.to_status()) <= STATUS_BYTES
