"""The generator's failures as gRPC statuses with google.rpc details (BadRequest, RetryInfo,
ErrorInfo): `MAPPING` from the engine layer's exceptions, which the common error-mapping
interceptor applies."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from services.common.errors import FailureMapping, RpcFailure, error_info, invalid_argument, retry_info
from services.generator.engine import (
    InvalidRequest,
    ModelLoading,
    ModelNotFound,
    OverCapacity,
    ShuttingDown,
)

DOMAIN = "inference.generator"


def resource_exhausted(message: str, retry_after: float, reason: str) -> RpcFailure:
    details = (retry_info(retry_after), error_info(reason, DOMAIN))
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details)


def unavailable(message: str, reason: str) -> RpcFailure:
    details = (retry_info(1.0), error_info(reason, DOMAIN))
    return RpcFailure(grpc.StatusCode.UNAVAILABLE, message, details)


def model_not_found(name: str, served: str) -> RpcFailure:
    info = error_details_pb2.ResourceInfo(
        resource_type="model", resource_name=name, description=f"this generator serves {served}"
    )
    return RpcFailure(grpc.StatusCode.NOT_FOUND, f"model {name!r} not found (available: {served})", (info,))


MAPPING = FailureMapping()
MAPPING.register(InvalidRequest, lambda error: invalid_argument(error.violations))
MAPPING.register(OverCapacity, lambda error: resource_exhausted(str(error), error.retry_after, error.reason))
MAPPING.register(ShuttingDown, lambda error: unavailable(str(error), "SHUTTING_DOWN"))
MAPPING.register(ModelLoading, lambda error: unavailable(str(error), "MODEL_LOADING"))
MAPPING.register(ModelNotFound, lambda error: model_not_found(error.name, error.served))
