"""The SSE framing of the native streams (services/common/sse.py) without a server: token events
printed as the transcoder printed them, [DONE] at the end, errors in band after the first event;
and every native RPC needing the generate scope at the gateway."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from inference.v1 import common_pb2, generation_pb2

from services.common import sse
from services.common.errors import RpcFailure, invalid_argument
from services.gateway import auth
from services.gateway import errors as gateway_errors

Message = generation_pb2.GenerateStreamResponse


def token(text: str, final: bool = False) -> Message:
    message = Message(request_id="r1", token=common_pb2.Token(id=7, text=text, logprob=-0.5))
    if final:
        message.finish_reason = common_pb2.FINISH_REASON_LENGTH
        message.generated_text = "Hi there"
        message.tokens_generated = 2
        message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    return message


async def messages(items: list[Message], error: BaseException | None = None) -> AsyncIterator[Message]:
    for item in items:
        yield item
    if error is not None:
        raise error


async def payloads(items: list[Message], error: BaseException | None = None) -> list[str]:
    events = [
        body async for body in sse.native_sse(messages(items, error), gateway_errors.MAPPING.failure_of)
    ]
    assert all(body.content_type == "text/event-stream" for body in events)
    data = b"".join(body.data for body in events).decode()
    assert data.endswith("\n\n")
    lines = data.split("\n\n")[:-1]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: ") :] for line in lines]


def event(payload: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(payload)
    return body


async def test_token_events_then_the_final_event_then_done() -> None:
    sent = await payloads([token("Hi"), token(" there", final=True)])
    assert sent[-1] == "[DONE]" and len(sent) == 3
    first, final = event(sent[0]), event(sent[1])
    # Proto field names, fields without presence printed, enums by name, as the transcoder did.
    assert first["finish_reason"] == "FINISH_REASON_UNSPECIFIED" and first["generated_text"] == ""
    assert first["token"] == {
        "id": 7,
        "text": "Hi",
        "logprob": -0.5,
        "special": False,
        "top_logprobs": [],
        "piece": "",
        "piece_bytes": "",
    }
    assert "usage" not in first and "answer" not in first and "error" not in first
    assert final["finish_reason"] == "FINISH_REASON_LENGTH"
    assert final["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_a_set_answer_is_printed_even_when_empty() -> None:
    final = token("x", final=True)
    final.answer = ""
    assert event((await payloads([final]))[0])["answer"] == ""


async def test_a_failure_after_the_first_event_is_an_error_event_and_no_done() -> None:
    failure = RpcFailure(grpc.StatusCode.UNAVAILABLE, "the generator went away")
    sent = await payloads([token("Hi")], failure)
    assert len(sent) == 2 and "[DONE]" not in sent
    error = event(sent[1])["error"]
    assert error["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert error["message"] == "the generator went away"


async def test_an_error_event_keeps_the_google_rpc_details() -> None:
    sent = await payloads([token("Hi")], invalid_argument([("parameters.max_tokens", "too many")]))
    details = event(sent[1])["error"]["details"]
    assert details[0]["@type"].endswith("google.rpc.BadRequest")
    assert details[0]["field_violations"][0]["field"] == "parameters.max_tokens"


async def test_a_failure_before_the_first_event_is_the_calls_status() -> None:
    failure = invalid_argument([("prompt", "must not be empty")])
    with pytest.raises(RpcFailure):
        await payloads([], failure)


async def test_an_unmapped_failure_is_not_reported_in_band() -> None:
    with pytest.raises(KeyError):
        await payloads([token("Hi")], KeyError("secret"))


def test_every_native_rpc_needs_the_generate_scope() -> None:
    for method in generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods:
        assert auth.METHOD_SCOPES[f"/inference.v1.GenerationService/{method.name}"] == "generate"
