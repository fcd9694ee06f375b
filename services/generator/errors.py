"""Engine refusals as gRPC statuses with google.rpc details (BadRequest, RetryInfo, ErrorInfo)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

DOMAIN = "inference.generator"


class RpcFailure(Exception):
    """Raised anywhere in a handler; turned into the RPC's status in one place."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    def to_status(self) -> status_pb2.Status:
        packed = []
        for detail in self.details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


def invalid_argument(violations: Sequence[tuple[str, str]]) -> RpcFailure:
    request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=why)
            for name, why in violations
        ]
    )
    message = "; ".join(f"{name}: {why}" for name, why in violations)
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message, (request,))


def resource_exhausted(message: str, retry_after: float, reason: str) -> RpcFailure:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, round(retry_after * 1e9)))
    return RpcFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        (
            error_details_pb2.RetryInfo(retry_delay=delay),
            error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN),
        ),
    )


def unavailable(message: str) -> RpcFailure:
    delay = duration_pb2.Duration(seconds=1)
    return RpcFailure(
        grpc.StatusCode.UNAVAILABLE,
        message,
        (
            error_details_pb2.RetryInfo(retry_delay=delay),
            error_details_pb2.ErrorInfo(reason="SHUTTING_DOWN", domain=DOMAIN),
        ),
    )


def model_not_found(name: str, served: str) -> RpcFailure:
    info = error_details_pb2.ResourceInfo(
        resource_type="model", resource_name=name, description=f"this generator serves {served}"
    )
    return RpcFailure(grpc.StatusCode.NOT_FOUND, f"model {name!r} not found (available: {served})", (info,))
