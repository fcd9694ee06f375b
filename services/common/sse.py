"""Server-sent events for the REST framings of the streaming RPCs (`stream google.api.HttpBody`):
`data: {...}` events, then `data: [DONE]`; a failure after the first event is an in-band error
event, one before it the call's status. Shared by the OpenAI and the native streams of every tier."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor, json_format
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message
from inference.v1 import generation_pb2

from services.common.errors import RpcFailure

SSE_CONTENT_TYPE = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"
# The most event bytes one stream keeps queued for a slow client before it stops reading from
# its backend (whose own flow control then holds the rest).
MAX_QUEUED_BYTES = 1 << 20


def sse_event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def http_body(data: bytes) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=SSE_CONTENT_TYPE, data=data)


class _Queue:
    """The encoded events of one stream between its reader task and its writer: the writer takes
    everything queued at once, so a client slower than the backend gets several events per write."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.size = 0
        self.ended = False
        self.failure: BaseException | None = None
        self.produced = False
        self._ready: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def _wake_writer(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def put(self, event: bytes) -> None:
        self.events.append(event)
        self.size += len(event)
        self.produced = True
        self._wake_writer()
        if self.size > MAX_QUEUED_BYTES:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def end(self, failure: BaseException | None) -> None:
        self.ended, self.failure = True, failure
        self._wake_writer()

    async def take(self) -> bytes:
        """Everything queued, waiting only while nothing is; b"" once the reader has ended."""
        while not self.events and not self.ended:
            self._ready = asyncio.get_running_loop().create_future()
            await self._ready
            self._ready = None
        taken = b"".join(self.events) if len(self.events) != 1 else self.events[0]
        self.events.clear()
        self.size = 0
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        return taken


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[Any]) -> AsyncIterator[None]:
    """Closes `iterator` (when it can be) on leaving, so a suspended backend generator runs its
    finally now rather than when the garbage collector finds it."""
    try:
        yield
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


async def _read_into(queue: _Queue, chunks: AsyncIterator[dict[str, Any]]) -> None:
    failure: BaseException | None = None
    try:
        async with _closing(chunks):
            async for body in chunks:
                await queue.put(sse_event(body))
    except Exception as raised:  # handed to the writer, which decides in band or status
        failure = raised
    except BaseException as raised:
        # A backend's own CancelledError (grpc.aio raises it for a call cancelled here, as when a
        # channel closes) must end the stream too, or the writer would wait for ever.
        failure = raised
        raise
    finally:
        queue.end(failure)


async def sse_stream(
    chunks: AsyncIterator[dict[str, Any]],
    failure_of: Callable[[BaseException], RpcFailure | None],
    error_event: Callable[[RpcFailure], bytes],
) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
    """The events of `chunks` in order, then [DONE]; events queued while a write waits on a slow
    client go out together in the next write (none is held back for others). A failure
    `failure_of` maps is the call's status before the first event and an `error_event` after it."""
    queue = _Queue()
    # A task of its own keeps reading the backend while a write waits on the client.
    reader = asyncio.create_task(_read_into(queue, chunks))
    # grpc may end the call's task while this generator waits at a yield (a cancel during a send),
    # leaving it unclosed: the reader must not outlive the call, or the backend runs on unread.
    owner = asyncio.current_task()

    def stop_reader(_owner: Any) -> None:
        reader.cancel()

    if owner is not None:
        owner.add_done_callback(stop_reader)
    try:
        while True:
            data = await queue.take()
            if not queue.ended:
                yield http_body(data)
                continue
            # The reader has ended: what it queued last goes out with the end of the stream.
            if queue.failure is None:
                yield http_body(data + DONE_EVENT)
                return
            # Only an Exception may become an error event: a CancelledError ends the call as it
            # did before the reader had a task of its own.
            error = failure_of(queue.failure) if isinstance(queue.failure, Exception) else None
            if error is None or not queue.produced:
                if data:
                    yield http_body(data)
                raise queue.failure
            yield http_body(data + error_event(error))
            return
    finally:
        if owner is not None:
            owner.remove_done_callback(stop_reader)
        if not reader.done():
            # The client went away (or the call was cancelled): stop reading, which cancels the
            # backend call and frees what it holds.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class _Fallback(Exception):
    """A field the fast printer does not print (well-known types, maps, unknown enum numbers)."""


def _fallback(_value: Any) -> Any:
    raise _Fallback


def _shortest_float(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return type_checkers.ToShortestFloat(value)


def _double(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return value


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode()


_FIELD = descriptor.FieldDescriptor
_INT64 = (_FIELD.CPPTYPE_INT64, _FIELD.CPPTYPE_UINT64)


class _Plan:
    """How one message type prints: a converter per field (None: the value as is) and the
    values printed for fields without presence that are not set, in declaration order."""

    def __init__(self, message_type: Any) -> None:
        self.convert: dict[str, Callable[[Any], Any] | None] = {}
        self.defaults: list[tuple[str, Any, bool]] = []
        for field in message_type.fields:
            element = _element_converter(field)
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            repeated = field.is_repeated
            if is_map:
                self.convert[field.name] = _fallback
                self.defaults.append((field.name, None, False))
                continue
            if repeated:
                self.convert[field.name] = _list_of(element)
            else:
                self.convert[field.name] = element
            if repeated:
                self.defaults.append((field.name, None, True))
            elif not field.has_presence:
                default = field.default_value if element is None else element(field.default_value)
                self.defaults.append((field.name, default, False))


def _list_of(element: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    if element is None:
        return list
    return lambda values: [element(value) for value in values]


def _element_converter(field: descriptor.FieldDescriptor) -> Callable[[Any], Any] | None:
    kind = field.cpp_type
    if kind == _FIELD.CPPTYPE_MESSAGE:
        assert field.message_type is not None
        if field.message_type.full_name.startswith("google.protobuf."):
            return _fallback  # well-known types have JSON forms of their own
        return _message_json
    if kind == _FIELD.CPPTYPE_ENUM:
        assert field.enum_type is not None
        if field.enum_type.full_name == "google.protobuf.NullValue":
            return _fallback
        names = {value.number: value.name for value in field.enum_type.values}

        def enum_name(number: int) -> str:
            name = names.get(number)
            if name is None:
                raise _Fallback
            return name

        return enum_name
    if kind == _FIELD.CPPTYPE_STRING:
        return _bytes if field.type == _FIELD.TYPE_BYTES else None
    if kind in _INT64:
        return str
    if kind == _FIELD.CPPTYPE_FLOAT:
        return _shortest_float
    if kind == _FIELD.CPPTYPE_DOUBLE:
        return _double
    return None  # bool, int32, uint32


_PLANS: dict[str, _Plan] = {}


def _message_json(message: Message) -> dict[str, Any]:
    message_type = message.DESCRIPTOR
    plan = _PLANS.get(message_type.full_name)
    if plan is None:
        plan = _PLANS[message_type.full_name] = _Plan(message_type)
    convert = plan.convert
    printed: dict[str, Any] = {}
    for field, value in message.ListFields():
        name = field.name
        try:
            converter = convert[name]
        except KeyError:
            raise _Fallback from None  # an extension
        printed[name] = value if converter is None else converter(value)
    for name, default, repeated in plan.defaults:
        if name not in printed:
            printed[name] = [] if repeated else ({} if default is None else default)
    return printed


def native_event_json(message: Message) -> dict[str, Any]:
    """A native stream message as Envoy's transcoder prints a typed stream: proto field names,
    fields without presence always printed, enums by name (json_format's output, printed faster)."""
    try:
        return _message_json(message)
    except _Fallback:
        return json_format.MessageToDict(
            message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )


def native_error_event(error: RpcFailure) -> bytes:
    """The in-band error of a native stream: a message with only `error` (a google.rpc.Status)."""
    return sse_event(native_event_json(generation_pb2.GenerateStreamResponse(error=error.to_status())))


async def native_sse(
    messages: AsyncIterator[Message],
    failure_of: Callable[[BaseException], RpcFailure | None],
) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
    """The SSE framing of a native token stream: one event per message (the last ones carry the
    finish reason and usage), then [DONE]."""

    async def bodies() -> AsyncIterator[dict[str, Any]]:
        async with _closing(messages):
            async for message in messages:
                yield native_event_json(message)

    # Closed with this generator, so that a client that leaves stops the backend call at once.
    async with contextlib.aclosing(sse_stream(bodies(), failure_of, native_error_event)) as events:
        async for event in events:
            yield event
