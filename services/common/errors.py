"""Failures as gRPC statuses with google.rpc details, shared by every service: a handler raises
`RpcFailure` or a domain exception its tier registered in a `FailureMapping`, and the error-mapping
interceptor turns either into the call's status."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status


@dataclass
class RpcFailure(Exception):
    """A failure the client should see with this code, message and details."""

    code: grpc.StatusCode
    message: str
    details: Sequence[Message] = field(default_factory=tuple)
    # Extra trailing metadata (ASCII keys and values), e.g. a marker a proxy acts on.
    trailers: Sequence[tuple[str, str]] = field(default_factory=tuple)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            status.details.add().Pack(detail)
        return status

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        status = rpc_status.to_status(bounded(self).to_status())
        await context.abort(status.code, status.details, (*status.trailing_metadata, *self.trailers))
        raise AssertionError("unreachable: abort raises")


ErrorT = TypeVar("ErrorT", bound=BaseException)


class FailureMapping:
    """Domain exception types to the failure a client sees; the most specific registered class
    of an error (along its MRO) decides, and an `RpcFailure` maps to itself."""

    def __init__(self) -> None:
        self._rules: dict[type[BaseException], Callable[[Any], RpcFailure]] = {}

    def register(self, kind: type[ErrorT], convert: Callable[[ErrorT], RpcFailure]) -> None:
        self._rules[kind] = convert

    def failure_of(self, error: BaseException) -> RpcFailure | None:
        """The failure for `error`, or None when no registered type covers it."""
        if isinstance(error, RpcFailure):
            return error
        for kind in type(error).__mro__:
            convert = self._rules.get(kind)
            if convert is not None:
                return convert(error)
        return None


# Bounds on what a refusal repeats of the request, in UTF-8 bytes. Its status travels in HTTP/2
# trailers: grpc-message (percent-encoded: a non-ASCII byte takes 3) and grpc-status-details-bin
# (base64 of the Status, which repeats the message). gRPC clients refuse more than 16 KiB of
# metadata with RESOURCE_EXHAUSTED (which REST clients see as a 429 and retry) and Envoy resets a
# reply past its own limit (a 503 "protocol error"), so a refusal keeps both under MAX_WIRE_BYTES.
MAX_LISTED_VIOLATIONS = 8
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 300
MAX_MESSAGE_BYTES = 2000
MAX_WIRE_BYTES = 6000
ELLIPSIS = "\u2026"


def clip(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` UTF-8 bytes (never inside a character) with an ellipsis
    when longer."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    room = max(0, limit - len(ELLIPSIS.encode()))
    return data[:room].decode("utf-8", "ignore") + ELLIPSIS


def encoded_message_bytes(message: str) -> int:
    """The size of `message` as gRPC sends it in grpc-message (percent-encoded UTF-8)."""
    return sum(
        1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in message.encode("utf-8", "replace")
    )


def wire_bytes(status: status_pb2.Status) -> int:
    """The trailers' size of `status`: grpc-message plus grpc-status-details-bin in base64."""
    return encoded_message_bytes(status.message) + 4 * -(-len(status.SerializeToString()) // 3)


def clip_encoded(text: str, limit: int) -> str:
    """`text` cut (with an ellipsis) so that its percent-encoded size is at most `limit`."""
    if encoded_message_bytes(text) <= limit:
        return text
    budget = max(0, limit - 3 * len(ELLIPSIS.encode()))
    kept: list[str] = []
    for char in text:
        cost = encoded_message_bytes(char)
        if cost > budget:
            break
        budget -= cost
        kept.append(char)
    return "".join(kept) + ELLIPSIS


def bounded(failure: RpcFailure) -> RpcFailure:
    """`failure`, its message clipped so that its trailers stay under MAX_WIRE_BYTES (the details
    the gateway builds are bounded already; a backend's are passed on as they are)."""
    status = failure.to_status()
    size = wire_bytes(status)
    if size <= MAX_WIRE_BYTES:
        return failure
    # The message counts twice: percent-encoded, and in the Status (base64: at most 4/3 x 3 bytes
    # a character, and never more than its percent-encoding) -- so each encoded byte saved twice.
    details = wire_bytes(status_pb2.Status(code=status.code, details=status.details))
    room = max(64, (MAX_WIRE_BYTES - details) // 2)
    return RpcFailure(failure.code, clip_encoded(failure.message, room), failure.details, failure.trailers)


def invalid_argument(violations: Sequence[tuple[str, str]]) -> RpcFailure:
    """INVALID_ARGUMENT naming the bad fields and why (as many of the first MAX_LISTED_VIOLATIONS,
    each clipped, as fit in MAX_WIRE_BYTES), with a BadRequest detail."""
    listed = [
        (clip(name, MAX_FIELD_BYTES), clip(why, MAX_DESCRIPTION_BYTES))
        for name, why in violations[:MAX_LISTED_VIOLATIONS]
    ]
    while True:
        failure = _invalid_argument(listed, len(violations))
        if len(listed) <= 1 or wire_bytes(failure.to_status()) <= MAX_WIRE_BYTES:
            return bounded(failure)
        listed.pop()


def _invalid_argument(listed: Sequence[tuple[str, str]], total: int) -> RpcFailure:
    request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=why) for name, why in listed
        ]
    )
    message = "; ".join(f"{name}: {why}" for name, why in listed)
    if total > len(listed):
        message += f"; and {total - len(listed)} more"
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, clip(message, MAX_MESSAGE_BYTES), (request,))


def not_found(what: str, name: str, known: Sequence[str] = ()) -> RpcFailure:
    """NOT_FOUND for the `what` called `name`, listing the `known` ones, with a ResourceInfo."""
    name = clip(name, MAX_DESCRIPTION_BYTES)
    hint = f" (available: {', '.join(known)})" if known else ""
    info = error_details_pb2.ResourceInfo(
        resource_type=what, resource_name=name, description=f"unknown {what}"
    )
    message = clip(f"{what} {name!r} not found{hint}", MAX_MESSAGE_BYTES)
    return bounded(RpcFailure(grpc.StatusCode.NOT_FOUND, message, (info,)))


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, round(seconds * 1e9)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def error_info(reason: str, domain: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)
