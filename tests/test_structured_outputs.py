"""Output constraints on the native API over the real stack (Envoy, gateway, generator with the
default model): regex, choice and JSON Schema hold for every one of 50 sampled requests decoding
together in one busy batch, the sequence ends with FINISH_REASON_CONSTRAINT_COMPLETE, a free
greedy request next to them is unchanged, and a refused constraint is a 400 naming the field
(unary, gRPC streams and native SSE alike)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx2
import jsonschema  # type: ignore[import-untyped]
import pytest
from google.protobuf import json_format, struct_pb2
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.fixtures_gateway import GatewayService
from tests.test_generation_penalties import bad_fields

TIMEOUT = 300.0
SEEDS = 50
# [0-9], not \d: the library's \d is any Unicode digit, as Python's is.
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
SENTIMENTS = ["positive", "negative", "neutral"]
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
DONE = {common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE, common_pb2.FINISH_REASON_EOS_TOKEN}
DONE_NAMES = {common_pb2.FinishReason.Name(reason) for reason in DONE}
Stub = generation_pb2_grpc.GenerationServiceStub


@pytest.fixture(scope="module")
def stub(gateway_service: GatewayService) -> Iterator[Stub]:
    with grpc.insecure_channel(gateway_service.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers(), timeout=TIMEOUT) as client:
        yield client


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role="user", content=text)]


def sampled(seed: int, **knobs: Any) -> common_pb2.SamplingParameters:
    return common_pb2.SamplingParameters(do_sample=True, temperature=1.0, seed=seed, **knobs)


def schema_struct(schema: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(schema)
    return struct


def chat_together(
    stub: Stub, gateway_service: GatewayService, requests: list[generation_pb2.ChatRequest]
) -> list[generation_pb2.ChatResponse]:
    """The replies to `requests`, all sent at once so that they share the generator's batch."""
    calls = [stub.Chat.future(r, timeout=TIMEOUT, metadata=gateway_service.metadata()) for r in requests]
    return [call.result() for call in calls]


def post_together(rest: httpx2.Client, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def post(body: dict[str, Any]) -> dict[str, Any]:
        reply = rest.post("/generate", json=body)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_a_regex_holds_for_every_sampled_seed_in_a_busy_batch_over_grpc(
    stub: Stub, gateway_service: GatewayService
) -> None:
    requests = [
        generation_pb2.ChatRequest(
            messages=user("Make up a US phone number."),
            parameters=sampled(seed, max_new_tokens=24, regex=PHONE),
        )
        for seed in range(SEEDS)
    ]
    replies = chat_together(stub, gateway_service, requests)
    texts = [reply.message.content for reply in replies]
    assert [text for text in texts if not re.fullmatch(PHONE, text)] == []
    assert all(reply.finish_reason in DONE for reply in replies)
    assert len(set(texts)) > SEEDS // 2  # sampled, not one answer fifty times


def test_a_choice_holds_for_every_sampled_seed_over_native_rest(rest: httpx2.Client) -> None:
    messages = [{"role": "user", "content": "Is 'I loved this film!' positive, negative or neutral?"}]
    bodies = [
        {
            "messages": messages,
            "parameters": {
                "do_sample": True,
                "temperature": 1.0,
                "seed": seed,
                "max_new_tokens": 8,
                "choice": SENTIMENTS,
            },
        }
        for seed in range(SEEDS)
    ]
    replies = post_together(rest, bodies)
    assert all(reply["generated_text"] in SENTIMENTS for reply in replies), replies
    assert all(reply["finish_reason"] in DONE_NAMES for reply in replies)
    assert len({reply["generated_text"] for reply in replies}) > 1


def test_a_json_schema_validates_greedy_over_native_rest(rest: httpx2.Client) -> None:
    body = {
        "messages": [{"role": "user", "content": "Describe a user of a wiki as JSON."}],
        "parameters": {"do_sample": False, "max_new_tokens": 100, "json_schema": PERSON},
    }
    reply = rest.post("/generate", json=body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    jsonschema.validate(json.loads(result["generated_text"]), PERSON)
    assert result["finish_reason"] in DONE_NAMES


def test_a_json_schema_validates_for_every_sampled_seed_in_a_busy_batch_over_grpc(
    stub: Stub, gateway_service: GatewayService
) -> None:
    requests = [
        generation_pb2.ChatRequest(
            messages=user("Describe a user of a wiki as JSON."),
            parameters=sampled(seed, max_new_tokens=100, json_schema=schema_struct(PERSON)),
        )
        for seed in range(SEEDS)
    ]
    replies = chat_together(stub, gateway_service, requests)
    for reply in replies:
        jsonschema.validate(json.loads(reply.message.content), PERSON)
        assert reply.finish_reason in DONE, reply


def test_a_stream_ends_with_constraint_complete_over_grpc(
    stub: Stub, gateway_service: GatewayService
) -> None:
    request = generation_pb2.GenerateStreamRequest(
        prompt="My phone number is",
        parameters=common_pb2.SamplingParameters(do_sample=False, max_new_tokens=24, regex=PHONE),
    )
    replies = list(stub.GenerateStream(request, timeout=TIMEOUT, metadata=gateway_service.metadata()))
    text = "".join(reply.token.text for reply in replies)
    assert re.fullmatch(PHONE, text) and replies[-1].generated_text == text
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE


def test_a_free_greedy_request_is_unchanged_next_to_constrained_rows(
    stub: Stub, gateway_service: GatewayService
) -> None:
    free = generation_pb2.ChatRequest(
        messages=user("What is the capital of France?"),
        parameters=common_pb2.SamplingParameters(do_sample=False, max_new_tokens=24),
    )
    (alone,) = chat_together(stub, gateway_service, [free])
    constrained = [
        generation_pb2.ChatRequest(
            messages=user("Describe a user of a wiki as JSON."),
            parameters=sampled(seed, max_new_tokens=40, json_schema=schema_struct(PERSON)),
        )
        for seed in range(6)
    ]
    *_, together = chat_together(stub, gateway_service, [*constrained, free])
    assert together.message.content == alone.message.content
    assert together.finish_reason == alone.finish_reason


@pytest.mark.parametrize(
    ("constraint", "field", "words"),
    [
        ({"json_schema": {"type": "foo"}}, "parameters.json_schema", "foo"),
        ({"regex": "a(b"}, "parameters.regex", "unclosed group"),
        ({"grammar": "start: missing"}, "parameters.grammar", "missing"),
        ({"choice": []}, "parameters.choice", "non-empty"),
    ],
)
def test_a_refused_constraint_is_a_400_naming_the_field_over_native_rest(
    rest: httpx2.Client, constraint: dict[str, Any], field: str, words: str
) -> None:
    body = {"prompt": "Hello", "parameters": {"max_new_tokens": 4, **constraint}}
    reply = rest.post("/generate", json=body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["message"]
    assert f"{field}:" in message and words in message, message


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refused_constraint_is_invalid_argument_naming_the_field_over_grpc(
    stub: Stub, gateway_service: GatewayService, streamed: bool
) -> None:
    parameters = common_pb2.SamplingParameters(max_new_tokens=4)
    json_format.ParseDict({"json_schema": {"type": "object", "properties": {"a": {"type": 5}}}}, parameters)
    with pytest.raises(grpc.RpcError) as failed:
        if streamed:
            request = generation_pb2.GenerateStreamRequest(prompt="Hello", parameters=parameters)
            list(stub.GenerateStream(request, timeout=TIMEOUT, metadata=gateway_service.metadata()))
        else:
            request_unary = generation_pb2.GenerateRequest(prompt="Hello", parameters=parameters)
            stub.Generate(request_unary, timeout=TIMEOUT, metadata=gateway_service.metadata())
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(failed.value) == {"parameters.json_schema"}


def test_a_constrained_native_sse_stream_ends_with_constraint_complete(rest: httpx2.Client) -> None:
    body = {
        "prompt": "My phone number is",
        "stream": True,
        "parameters": {"do_sample": False, "max_new_tokens": 24, "regex": PHONE},
    }
    with rest.stream("POST", "/generate", json=body) as reply:
        assert reply.status_code == 200, reply.read().decode()
        payloads = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    events = [json.loads(item) for item in payloads if item != "[DONE]"]
    final = events[-1]
    assert re.fullmatch(PHONE, "".join(event["token"]["text"] for event in events))
    assert final["finish_reason"] == "FINISH_REASON_CONSTRAINT_COMPLETE"


def test_a_refused_constraint_on_a_native_sse_stream_is_a_400(rest: httpx2.Client) -> None:
    body = {"prompt": "Hello", "stream": True, "parameters": {"max_new_tokens": 4, "regex": "a(b"}}
    with rest.stream("POST", "/generate", json=body) as reply:
        text = reply.read().decode()
    assert reply.status_code == 400, text
    assert "parameters.regex:" in text
