"""Engine errors as gRPC statuses with google.rpc details (BadRequest, RetryInfo, ErrorInfo)."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]

from services.common.errors import RpcFailure, error_info, invalid_argument, retry_info
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


def failure_of(error: EmbedderError) -> RpcFailure:
    """The status code, message and details that describe `error`."""
    if isinstance(error, InvalidInput):
        return invalid_argument([(error.field, error.description)])
    code = grpc.StatusCode.INTERNAL
    details: list[Any] = []
    if isinstance(error, ModelNotFound):
        code, details = grpc.StatusCode.NOT_FOUND, [error_info("MODEL_NOT_FOUND", DOMAIN, model=error.model)]
    elif isinstance(error, ModelUnavailable):
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="MODEL", subject=error.model, description=error.reason
        )
        code = grpc.StatusCode.FAILED_PRECONDITION
        details = [
            error_info("MODEL_NOT_LOADABLE", DOMAIN, model=error.model),
            error_details_pb2.PreconditionFailure(violations=[violation]),
        ]
    elif isinstance(error, ModelTooLarge):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        details = [error_info("MODEL_TOO_LARGE", DOMAIN, model=error.model)]
    elif isinstance(error, Overloaded):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        details = [retry_info(error.retry_after_s), error_info("OVERLOADED", DOMAIN)]
    elif isinstance(error, ShuttingDown):
        code, details = grpc.StatusCode.UNAVAILABLE, [error_info("SHUTTING_DOWN", DOMAIN)]
    return RpcFailure(code, str(error), details)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: EmbedderError) -> NoReturn:
    await failure_of(error).abort(context)
