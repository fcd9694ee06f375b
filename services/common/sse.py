"""Server-sent events for the REST framings of the streaming RPCs (`stream google.api.HttpBody`):
`data: {...}` events, then `data: [DONE]`; a failure after the first event is an in-band error
event, one before it the call's status. Shared by the OpenAI and the native streams of every tier."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format
from inference.v1 import generation_pb2

from services.common.errors import RpcFailure

SSE_CONTENT_TYPE = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def http_body(data: bytes) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=SSE_CONTENT_TYPE, data=data)


async def sse_stream(
    chunks: AsyncIterator[dict[str, Any]],
    failure_of: Callable[[BaseException], RpcFailure | None],
    error_event: Callable[[RpcFailure], bytes],
) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """One event per chunk, then [DONE]. A failure `failure_of` maps is the call's status before
    the first event (an HTTP error) and an `error_event` after it (never a clean end)."""
    sent = False
    try:
        async for body in chunks:
            sent = True
            yield http_body(sse_event(body))
    except Exception as raised:
        error = failure_of(raised)
        if error is None or not sent:
            raise
        yield http_body(error_event(error))
        return
    yield http_body(DONE_EVENT)


def native_event_json(message: generation_pb2.GenerateStreamResponse) -> dict[str, Any]:
    """A native stream message as Envoy's transcoder prints a typed stream: proto field names,
    fields without presence always printed, enums by name."""
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


def native_error_event(error: RpcFailure) -> bytes:
    """The in-band error of a native stream: a message with only `error` (a google.rpc.Status)."""
    return sse_event(native_event_json(generation_pb2.GenerateStreamResponse(error=error.to_status())))


async def native_sse(
    messages: AsyncIterator[generation_pb2.GenerateStreamResponse],
    failure_of: Callable[[BaseException], RpcFailure | None],
) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """The SSE framing of a native token stream: one event per message (the last ones carry the
    finish reason and usage), then [DONE]."""

    async def bodies() -> AsyncIterator[dict[str, Any]]:
        async for message in messages:
            yield native_event_json(message)

    async for event in sse_stream(bodies(), failure_of, native_error_event):
        yield event
