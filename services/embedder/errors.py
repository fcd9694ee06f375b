"""The embedder's failures as gRPC statuses with google.rpc details (BadRequest, RetryInfo,
ErrorInfo, PreconditionFailure): `MAPPING` from the engine's exceptions, which the common
error-mapping interceptor applies."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]

from services.common.errors import FailureMapping, RpcFailure, error_info, invalid_argument, retry_info
from services.embedder.exceptions import (
    EmbedderError,
    InvalidInput,
    ModelNotFound,
    ModelTooLarge,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)

DOMAIN = "embedder.inference.v1"


def _invalid_input(error: InvalidInput) -> RpcFailure:
    return invalid_argument([(error.field, error.description)])


def _model_not_found(error: ModelNotFound) -> RpcFailure:
    info = error_info("MODEL_NOT_FOUND", DOMAIN, model=error.model)
    return RpcFailure(grpc.StatusCode.NOT_FOUND, str(error), [info])


def _model_unavailable(error: ModelUnavailable) -> RpcFailure:
    violation = error_details_pb2.PreconditionFailure.Violation(
        type="MODEL", subject=error.model, description=error.reason
    )
    details = [
        error_info("MODEL_NOT_LOADABLE", DOMAIN, model=error.model),
        error_details_pb2.PreconditionFailure(violations=[violation]),
    ]
    return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(error), details)


def _model_too_large(error: ModelTooLarge) -> RpcFailure:
    info = error_info("MODEL_TOO_LARGE", DOMAIN, model=error.model)
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), [info])


def _overloaded(error: Overloaded) -> RpcFailure:
    details = [retry_info(error.retry_after_s), error_info("OVERLOADED", DOMAIN)]
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), details)


def _shutting_down(error: ShuttingDown) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNAVAILABLE, str(error), [error_info("SHUTTING_DOWN", DOMAIN)])


MAPPING = FailureMapping()
MAPPING.register(InvalidInput, _invalid_input)
MAPPING.register(ModelNotFound, _model_not_found)
MAPPING.register(ModelUnavailable, _model_unavailable)
MAPPING.register(ModelTooLarge, _model_too_large)
MAPPING.register(Overloaded, _overloaded)
MAPPING.register(ShuttingDown, _shutting_down)
# Any other engine error is the server's fault, but its message is meant for the caller.
MAPPING.register(EmbedderError, lambda error: RpcFailure(grpc.StatusCode.INTERNAL, str(error)))
