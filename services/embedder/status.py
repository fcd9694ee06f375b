"""Engine errors as gRPC statuses with google.rpc details (BadRequest, RetryInfo, ErrorInfo)."""

from __future__ import annotations

import math
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from services.embedder.errors import (
    EmbedderError,
    InvalidInput,
    ModelNotFound,
    ModelTooLarge,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)

DOMAIN = "embedder.inference.v1"


def _info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def status_of(error: EmbedderError) -> tuple[grpc.StatusCode, str, list[Message]]:
    """The status code, message and details that describe `error`."""
    if isinstance(error, InvalidInput):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            str(error),
            [error_details_pb2.BadRequest(field_violations=[violation])],
        )
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(error), [_info("MODEL_NOT_FOUND", model=error.model)]
    if isinstance(error, ModelUnavailable):
        details: list[Message] = [
            _info("MODEL_NOT_LOADABLE", model=error.model),
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="MODEL", subject=error.model, description=error.reason
                    )
                ]
            ),
        ]
        return grpc.StatusCode.FAILED_PRECONDITION, str(error), details
    if isinstance(error, ModelTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), [_info("MODEL_TOO_LARGE", model=error.model)]
    if isinstance(error, Overloaded):
        seconds = math.floor(error.retry_after_s)
        nanos = int((error.retry_after_s - seconds) * 1e9)
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.seconds = seconds
        retry.retry_delay.nanos = nanos
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), [retry, _info("OVERLOADED")]
    if isinstance(error, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, str(error), [_info("SHUTTING_DOWN")]
    return grpc.StatusCode.INTERNAL, str(error), []


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: EmbedderError) -> NoReturn:
    code, message, details = status_of(error)
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    await context.abort(
        code, message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )
    raise AssertionError("context.abort returned")  # pragma: no cover
