"""The gateway's failures with google.rpc details and `MAPPING`, which the common error-mapping
interceptor uses: a gateway failure is its own status, a backend's error keeps its status."""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from services.common.errors import FailureMapping, RpcFailure, error_info, retry_info

# Re-exported: handlers raise these through this module.
from services.common.errors import invalid_argument as invalid_argument
from services.common.errors import not_found as not_found

ERROR_DOMAIN = "inference.gateway"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


# The gateway's failures are the shared kind; the name says where they were raised.
GatewayError = RpcFailure


def resource_exhausted(
    message: str, retry_after: float, reason: str, metadata: dict[str, str]
) -> GatewayError:
    details = (retry_info(retry_after), error_info(reason, ERROR_DOMAIN, **metadata))
    return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details)


def unauthenticated(message: str, reason: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAUTHENTICATED, message, (error_info(reason, ERROR_DOMAIN),))


def permission_denied(message: str, scope: str) -> GatewayError:
    info = error_info("MISSING_SCOPE", ERROR_DOMAIN, scope=scope)
    return GatewayError(grpc.StatusCode.PERMISSION_DENIED, message, (info,))


# How long a client is told to wait when a backend is unreachable or draining and said nothing
# itself: about the time a tier takes to restart, or another replica to take over.
BACKEND_RETRY_SECONDS = 1.0


def unavailable(message: str, reason: str, retry_after: float = BACKEND_RETRY_SECONDS) -> GatewayError:
    details = (retry_info(retry_after), error_info(reason, ERROR_DOMAIN))
    return GatewayError(grpc.StatusCode.UNAVAILABLE, message, details)


def from_backend(error: grpc.aio.AioRpcError) -> GatewayError:
    """The backend's status as the gateway's own, keeping its google.rpc details; an UNAVAILABLE
    without a RetryInfo (a tier down or draining) gets one, so that clients know to retry."""
    status = _backend_status(error)
    if status is None:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            # grpc's own transport text ("failed to connect to all addresses; last error: ...")
            # names internal addresses and says nothing a client can act on.
            return unavailable(
                "a backend tier is unavailable (restarting or draining); retry shortly", "BACKEND_UNAVAILABLE"
            )
        return GatewayError(error.code(), error.details() or error.code().name)
    details: list[Message] = []
    for holder in status.details:
        detail = _unpack(holder)
        if detail is not None:
            details.append(detail)
    if error.code() == grpc.StatusCode.UNAVAILABLE and not any(
        isinstance(detail, error_details_pb2.RetryInfo) for detail in details
    ):
        details.insert(0, retry_info(BACKEND_RETRY_SECONDS))
    return GatewayError(error.code(), status.message or error.details() or error.code().name, details)


def renamed(error: GatewayError, names: dict[str, str]) -> GatewayError:
    """`error` with each field path that starts with a key of `names` (and the message's mention of
    it) renamed to the value: the name the client's own API gives the field."""
    if not names or error.code != grpc.StatusCode.INVALID_ARGUMENT:
        return error

    def rename(path: str) -> str:
        for old, new in names.items():
            if path == old or path.startswith((f"{old}.", f"{old}[")):
                return new + path[len(old) :]
        return path

    details: list[Message] = []
    for detail in error.details:
        if isinstance(detail, error_details_pb2.BadRequest):
            violations = [
                error_details_pb2.BadRequest.FieldViolation(field=rename(v.field), description=v.description)
                for v in detail.field_violations
            ]
            detail = error_details_pb2.BadRequest(field_violations=violations)
        details.append(detail)
    message = error.message
    for old, new in names.items():
        message = message.replace(old, new)
    return GatewayError(error.code, message, details)


def _backend_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


def _unpack(holder: any_pb2.Any) -> Message | None:
    for kind in _DETAIL_TYPES:
        if holder.Is(kind.DESCRIPTOR):  # type: ignore[arg-type]
            detail = kind()
            holder.Unpack(detail)
            return detail
    return None


def retry_delay(error: GatewayError) -> float | None:
    for detail in error.details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            return float(detail.retry_delay.ToNanoseconds()) / 1e9
    return None


MAPPING = FailureMapping()
MAPPING.register(grpc.aio.AioRpcError, from_backend)


def http_like(code: grpc.StatusCode) -> int:
    """The HTTP status Envoy gives a gRPC code (for in-band SSE errors)."""
    return _HTTP.get(code, 500)


_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
