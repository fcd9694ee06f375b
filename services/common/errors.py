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

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            status.details.add().Pack(detail)
        return status

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort_with_status(rpc_status.to_status(self.to_status()))
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


# Bounds on what a refusal repeats of the request. Its status travels in HTTP/2 trailers
# (grpc-message and grpc-status-details-bin), which Envoy (60 KiB) and gRPC clients limit: a
# description quoting a 100 kB value made Envoy reset the reply ("protocol error", a 503).
MAX_LISTED_VIOLATIONS = 8
MAX_FIELD_CHARS = 100
MAX_DESCRIPTION_CHARS = 300
MAX_MESSAGE_CHARS = 2000


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def invalid_argument(violations: Sequence[tuple[str, str]]) -> RpcFailure:
    """INVALID_ARGUMENT naming every bad field and why (the first MAX_LISTED_VIOLATIONS, each
    clipped), with a BadRequest detail."""
    listed = [
        (clip(name, MAX_FIELD_CHARS), clip(why, MAX_DESCRIPTION_CHARS))
        for name, why in violations[:MAX_LISTED_VIOLATIONS]
    ]
    request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=why) for name, why in listed
        ]
    )
    message = "; ".join(f"{name}: {why}" for name, why in listed)
    if len(violations) > len(listed):
        message += f"; and {len(violations) - len(listed)} more"
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, clip(message, MAX_MESSAGE_CHARS), (request,))


def not_found(what: str, name: str, known: Sequence[str] = ()) -> RpcFailure:
    """NOT_FOUND for the `what` called `name`, listing the `known` ones, with a ResourceInfo."""
    name = clip(name, MAX_DESCRIPTION_CHARS)
    hint = f" (available: {', '.join(known)})" if known else ""
    info = error_details_pb2.ResourceInfo(
        resource_type=what, resource_name=name, description=f"unknown {what}"
    )
    message = clip(f"{what} {name!r} not found{hint}", MAX_MESSAGE_CHARS)
    return RpcFailure(grpc.StatusCode.NOT_FOUND, message, (info,))


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, round(seconds * 1e9)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def error_info(reason: str, domain: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)
