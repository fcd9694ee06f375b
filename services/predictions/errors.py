"""The predictions service's failures with google.rpc details and `MAPPING` for the common
error-mapping interceptor: store exceptions and the gateway's own statuses become the call's."""

from __future__ import annotations

import grpc
import grpc.aio
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from services.common.errors import FailureMapping, RpcFailure, error_info, retry_info
from services.common.errors import invalid_argument as invalid_argument
from services.common.errors import not_found as not_found
from services.predictions.records import QueueFull

ERROR_DOMAIN = "inference.predictions"
# How long a client told "queue full" waits before it tries again.
QUEUE_RETRY_SECONDS = 1.0


def permission_denied(message: str, scope: str) -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.PERMISSION_DENIED, message, (error_info("MISSING_SCOPE", ERROR_DOMAIN, scope=scope),)
    )


def queue_full(error: QueueFull) -> RpcFailure:
    details = (
        retry_info(QUEUE_RETRY_SECONDS),
        error_info("QUEUE_FULL", ERROR_DOMAIN, scope=error.scope, limit=str(error.limit)),
    )
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), details)


def already_exists(name: str) -> RpcFailure:
    info = error_details_pb2.ResourceInfo(
        resource_type="deployment", resource_name=name, description="a deployment of this name exists"
    )
    return RpcFailure(grpc.StatusCode.ALREADY_EXISTS, f"deployment {name!r} already exists", (info,))


def prediction_restarted(prediction_id: str, attempt: int) -> RpcFailure:
    """A stream whose prediction was rerun with other text than the stream already sent."""
    return RpcFailure(
        grpc.StatusCode.ABORTED,
        f"prediction {prediction_id} was run again (run {attempt}) after its worker was lost, and "
        "the new run's text does not continue what this stream sent; stream it again to follow the "
        "new run from its first token",
        (error_info("PREDICTION_RESTARTED", ERROR_DOMAIN, id=prediction_id, attempt=str(attempt)),),
    )


def from_gateway(error: grpc.aio.AioRpcError) -> RpcFailure:
    """A failed call to the gateway (e.g. listing models) keeps its status and message."""
    return RpcFailure(error.code(), f"gateway: {error.details() or error.code().name}")


MAPPING = FailureMapping()
MAPPING.register(QueueFull, queue_full)
MAPPING.register(grpc.aio.AioRpcError, from_gateway)
