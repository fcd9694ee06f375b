"""Exceptions that carry the gRPC status code, its message and the google.rpc details the server
attached (BadRequest field violations, RetryInfo, ErrorInfo, ...), one subclass per code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

# googleapis-common-protos ships no type stubs; these modules are typed as Any here.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InferenceError(Exception):
    """A failed call: `code`, `message` and the decoded google.rpc `details`."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details: tuple[Message, ...] = tuple(details)

    def detail(self, kind: type[_M]) -> _M | None:
        """The first detail of this type, if the server sent one."""
        for item in self.details:
            if isinstance(item, kind):
                return item
        return None

    @property
    def field_violations(self) -> list[FieldViolation]:
        """The BadRequest violations: which request field was wrong and why."""
        return [
            FieldViolation(violation.field, violation.description)
            for item in self.details
            if isinstance(item, error_details_pb2.BadRequest)
            for violation in item.field_violations
        ]

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asks to wait before trying again (RetryInfo)."""
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None:
            return None
        nanoseconds: int = info.retry_delay.ToNanoseconds()
        return nanoseconds / 1e9

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        return self.detail(error_details_pb2.ErrorInfo)


class InvalidArgumentError(InferenceError):
    """The request was malformed or out of limits; see `field_violations`."""


class NotFoundError(InferenceError):
    """An unknown model or resource."""


class ResourceExhaustedError(InferenceError):
    """Over capacity or over a rate limit; see `retry_delay`."""


class UnavailableError(InferenceError):
    """The server could not be reached, after the client's retries."""


class DeadlineExceededError(InferenceError):
    """The call's deadline passed before it finished."""


class UnauthenticatedError(InferenceError):
    """A missing or wrong API key."""


class PermissionDeniedError(InferenceError):
    """The API key lacks the scope this call needs."""


class CancelledError(InferenceError):
    """The call was cancelled (by this client or the server)."""


class FailedPreconditionError(InferenceError):
    pass


class UnimplementedError(InferenceError):
    pass


class InternalError(InferenceError):
    pass


ERROR_TYPES: dict[grpc.StatusCode, type[InferenceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
}

_DETAIL_TYPES: dict[str, type[Message]] = {
    kind.DESCRIPTOR.full_name: kind
    for kind in (
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.RequestInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


def _unpack(holder: any_pb2.Any) -> Message | None:
    kind = _DETAIL_TYPES.get(holder.TypeName())
    if kind is None:
        return None
    detail = kind()
    holder.Unpack(detail)
    return detail


def _status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    if not callable(getattr(error, "trailing_metadata", None)):
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        # grpcio-status refuses details whose code or message disagree with the call's status.
        return None
    return status


def from_rpc_error(error: grpc.RpcError) -> InferenceError:
    """The typed exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    message = ""
    # Both the sync call errors and AioRpcError expose code()/details() as plain methods.
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    if callable(code_of):
        code = code_of()
    if callable(details_of):
        message = details_of() or ""
    status = _status_of(error)
    details: list[Message] = []
    if status is not None:
        message = status.message or message
        for holder in status.details:
            detail = _unpack(holder)
            if detail is not None:
                details.append(detail)
    kind = ERROR_TYPES.get(code, InferenceError)
    return kind(code, message or code.name, details)
