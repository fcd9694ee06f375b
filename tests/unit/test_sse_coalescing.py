"""The SSE writer of services/common/sse.py without a server: events queued while a write waits on
a slow client go out together (in order, none lost, [DONE] last), a client that keeps up gets each
event at once, a client that leaves stops the backend stream; and the fast printer of native
events gives json_format's output, byte for byte."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from inference.v1 import common_pb2, generation_pb2

from services.common import sse
from services.common.errors import RpcFailure, invalid_argument
from services.gateway import errors as gateway_errors

Message = generation_pb2.GenerateStreamResponse
failure_of = gateway_errors.MAPPING.failure_of


def token(number: int) -> Message:
    return Message(request_id="r1", token=common_pb2.Token(id=number, text=f"t{number}"))


def data_lines(bodies: list[bytes]) -> list[str]:
    """Every `data:` payload of the bodies, in order; each event must be whole within one body."""
    payloads: list[str] = []
    for body in bodies:
        text = body.decode()
        assert text.endswith("\n\n"), text
        for event in text.split("\n\n")[:-1]:
            assert event.startswith("data: ") and "\n" not in event, event
            payloads.append(event[len("data: ") :])
    return payloads


async def test_a_slow_client_gets_every_event_in_order_in_fewer_writes() -> None:
    count = 200
    produced = 0

    async def fast_backend() -> AsyncIterator[Message]:
        nonlocal produced
        for number in range(count):
            produced += 1
            yield token(number)
            await asyncio.sleep(0)

    bodies: list[bytes] = []
    async for body in sse.native_sse(fast_backend(), failure_of):
        bodies.append(body.data)
        await asyncio.sleep(0.005)  # the write waits on a slow client
    payloads = data_lines(bodies)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    assert [json.loads(item)["token"]["id"] for item in payloads[:-1]] == list(range(count))
    # The backend was read on while the writes waited: several events per write.
    assert len(bodies) < count / 4, len(bodies)


async def test_a_client_that_keeps_up_gets_each_event_by_itself_at_once() -> None:
    delivered = asyncio.Event()

    async def slow_backend() -> AsyncIterator[Message]:
        for number in range(5):
            delivered.clear()
            yield token(number)
            # The next token comes only once this one reached the client: nothing waits for it.
            await asyncio.wait_for(delivered.wait(), timeout=5)

    bodies: list[bytes] = []
    async for body in sse.native_sse(slow_backend(), failure_of):
        bodies.append(body.data)
        delivered.set()
    assert [data_lines([body]) for body in bodies[:-1]] == [
        [json.dumps(sse.native_event_json(token(n)), ensure_ascii=False, separators=(",", ":"))]
        for n in range(5)
    ]
    assert data_lines([bodies[-1]]) == ["[DONE]"]


async def test_events_queued_before_a_failure_go_out_then_the_error_event() -> None:
    async def failing_backend() -> AsyncIterator[Message]:
        for number in range(20):
            yield token(number)
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the generator went away")

    bodies = []
    async for body in sse.native_sse(failing_backend(), failure_of):
        bodies.append(body.data)
        await asyncio.sleep(0.01)
    payloads = data_lines(bodies)
    assert "[DONE]" not in payloads and len(payloads) == 21
    assert [json.loads(item)["token"]["id"] for item in payloads[:-1]] == list(range(20))
    assert json.loads(payloads[-1])["error"]["message"] == "the generator went away"


async def test_a_failure_before_any_event_is_still_the_calls_status() -> None:
    async def refusing_backend() -> AsyncIterator[Message]:
        raise invalid_argument([("prompt", "must not be empty")])
        yield token(0)  # pragma: no cover - makes this an async generator

    with pytest.raises(RpcFailure):
        async for _ in sse.native_sse(refusing_backend(), failure_of):
            pass


async def backend_until_closed(started: asyncio.Event, closed: asyncio.Event) -> AsyncIterator[Message]:
    """A long stream that records being closed, as a cancelled gRPC call to the generator is."""
    try:
        for number in range(10_000):
            if number == 3:
                started.set()
            yield token(number)
            await asyncio.sleep(0.001)
    finally:
        closed.set()


async def test_a_client_that_leaves_closes_the_backend_stream() -> None:
    started, closed = asyncio.Event(), asyncio.Event()
    stream = sse.native_sse(backend_until_closed(started, closed), failure_of)
    await anext(stream)
    await asyncio.wait_for(started.wait(), timeout=5)
    await stream.aclose()  # grpc closes the handler's generator when the client goes away
    assert closed.is_set()


async def test_a_cancelled_call_closes_the_backend_stream() -> None:
    started, closed = asyncio.Event(), asyncio.Event()

    async def handler() -> None:
        async for _ in sse.native_sse(backend_until_closed(started, closed), failure_of):
            await asyncio.sleep(0.01)

    task = asyncio.create_task(handler())
    await asyncio.wait_for(started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(closed.wait(), timeout=5)


async def test_a_client_that_never_reads_holds_a_bounded_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_QUEUED_BYTES", 2000)
    read = 0

    async def counted() -> AsyncIterator[Message]:
        nonlocal read
        for number in range(1000):
            read += 1
            yield token(number)

    stream = sse.native_sse(counted(), failure_of)
    first = await anext(stream)
    await asyncio.sleep(0.2)  # no write for a while: the reader stops past the bound
    assert read < 100, read
    rest = [body.data async for body in stream]
    payloads = data_lines([first.data, *rest])
    assert [json.loads(item)["token"]["id"] for item in payloads[:-1]] == list(range(1000))
    assert payloads[-1] == "[DONE]"


async def test_a_backend_cancelled_error_ends_the_stream_as_the_calls_cancellation() -> None:
    # grpc.aio raises CancelledError from a call cancelled on this side (Channel.close at replica
    # retirement): the stream must end with it, after what was queued, instead of waiting for ever.
    async def cancelled_backend() -> AsyncIterator[Message]:
        for number in range(3):
            yield token(number)
        raise asyncio.CancelledError

    bodies: list[bytes] = []

    async def handler() -> None:
        async for body in sse.native_sse(cancelled_backend(), failure_of):
            bodies.append(body.data)

    task = asyncio.create_task(handler())
    await asyncio.wait({task}, timeout=5)
    assert task.done(), "the stream hung after the backend raised CancelledError"
    assert task.cancelled()  # no error event, no [DONE]: the call is cancelled, as before
    assert [json.loads(item)["token"]["id"] for item in data_lines(bodies)] == [0, 1, 2]


async def test_a_backend_cancelled_error_before_any_event_ends_the_stream() -> None:
    async def cancelled_backend() -> AsyncIterator[Message]:
        raise asyncio.CancelledError
        yield token(0)  # pragma: no cover - makes this an async generator

    async def handler() -> None:
        async for _ in sse.native_sse(cancelled_backend(), failure_of):
            pass  # pragma: no cover - nothing is sent

    task = asyncio.create_task(handler())
    await asyncio.wait({task}, timeout=5)
    assert task.done() and task.cancelled()


async def backend_at_the_bound(blocked: asyncio.Event, closed: asyncio.Event) -> AsyncIterator[Message]:
    """A stream that the reader outruns; records being closed, as a gRPC call to the generator is."""
    try:
        for number in range(10_000):
            if number == 50:
                blocked.set()
            yield token(number)
    finally:
        closed.set()


async def test_a_client_that_leaves_while_the_reader_waits_at_the_bound_closes_the_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "MAX_QUEUED_BYTES", 2000)
    blocked, closed = asyncio.Event(), asyncio.Event()
    stream = sse.native_sse(backend_at_the_bound(blocked, closed), failure_of)
    await anext(stream)
    await asyncio.sleep(0.05)  # the reader fills the queue and waits at the bound, not the backend
    assert not blocked.is_set() or not closed.is_set()
    await stream.aclose()  # grpc closes the handler's generator when the client goes away
    assert closed.is_set(), "the backend generator was left for the garbage collector"


async def test_a_cancelled_call_while_the_reader_waits_at_the_bound_closes_the_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "MAX_QUEUED_BYTES", 2000)
    blocked, closed = asyncio.Event(), asyncio.Event()
    first = asyncio.Event()
    never = asyncio.Event()

    # Held here, as grpc may hold the handler's generator, so no finalizer closes it for us.
    stream = sse.native_sse(backend_at_the_bound(blocked, closed), failure_of)

    async def handler() -> None:
        async for _ in stream:
            first.set()
            await never.wait()  # a client that stops reading

    task = asyncio.create_task(handler())
    await asyncio.wait_for(first.wait(), timeout=5)
    await asyncio.sleep(0.05)  # the reader waits at the bound
    assert not closed.is_set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The stream's generator waits unclosed at a yield: the reader ends with the call's task.
    await asyncio.wait_for(closed.wait(), timeout=5)


# --- the fast printer against json_format -------------------------------------------------------

texts = st.text(max_size=12)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
doubles = st.floats(allow_nan=True, allow_infinity=True)
uint32s = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def tokens(draw: st.DrawFn) -> common_pb2.Token:
    return common_pb2.Token(
        id=draw(uint32s),
        text=draw(texts),
        logprob=draw(floats32),
        special=draw(st.booleans()),
        piece=draw(texts),
        piece_bytes=draw(st.binary(max_size=8)),
        top_logprobs=[
            common_pb2.TopLogprob(
                id=draw(uint32s), text=draw(texts), logprob=draw(floats32), bytes=draw(st.binary())
            )
            for _ in range(draw(st.integers(0, 2)))
        ],
    )


@st.composite
def stream_messages(draw: st.DrawFn) -> Message:
    message = Message(request_id=draw(texts), index=draw(uint32s))
    if draw(st.booleans()):
        message.token.CopyFrom(draw(tokens()))
    if draw(st.booleans()):
        message.finish_reason = draw(st.sampled_from(list(common_pb2.FinishReason.values())))
        message.generated_text = draw(texts)
        message.tokens_generated = draw(uint32s)
        message.generation_time = draw(doubles)
        message.tokens_per_second = draw(doubles)
    if draw(st.booleans()):
        message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=draw(uint32s), completion_tokens=draw(uint32s)))
    for name in ("answer", "code", "language"):
        if draw(st.booleans()):
            setattr(message, name, draw(texts))
    message.prompt_tokens.extend(draw(st.lists(tokens(), max_size=2)))
    if draw(st.booleans()):
        message.finish_reason = draw(st.integers(5, 9))  # type: ignore[assignment]  # an enum number this build does not know
    if draw(st.booleans()):
        message.error.CopyFrom(invalid_argument([("prompt", draw(texts))]).to_status())
    return message


def printed(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


@settings(max_examples=300, deadline=None)
@given(stream_messages())
def test_the_fast_printer_prints_what_json_format_prints(message: Message) -> None:
    expected = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    assert printed(sse.native_event_json(message)) == printed(expected)


def test_the_fast_printer_keeps_float32_logprobs_short() -> None:
    body = sse.native_event_json(Message(token=common_pb2.Token(logprob=-0.1)))
    assert body["token"]["logprob"] == -0.1 and not math.isnan(body["token"]["logprob"])
