"""The one helper every gateway interceptor uses to wrap a method's behaviour, and the
interceptor that turns gateway and backend errors into a gRPC status with details."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
import grpc.aio

from services.gateway.errors import GatewayError, abort_with, from_backend

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:  # grpc's classes are generic only in its stubs
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
UnaryBehavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
StreamBehavior: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

# Services whose calls carry policy; health checks and reflection pass untouched.
POLICY_PREFIX = "/inference.v1."


class BehaviorWrapper:
    """Wraps the unary-request behaviours of the inference.v1 services; subclasses override
    `unary` and `stream` (each receives the method name and the inner behaviour)."""

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        return behavior

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        return behavior


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies `wrappers` (outermost first) to each inference.v1 method once, and reuses the
    wrapped handler for every later call of that method."""

    def __init__(self, wrappers: Sequence[BehaviorWrapper]) -> None:
        self._wrappers = list(wrappers)
        self._handlers: dict[str, Handler] = {}

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.response_streaming:
            stream = cast(StreamBehavior, handler.unary_stream)
            for wrapper in reversed(self._wrappers):
                stream = wrapper.stream(method, stream)
            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        unary = cast(UnaryBehavior, handler.unary_unary)
        for wrapper in reversed(self._wrappers):
            unary = wrapper.unary(method, unary)
        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(POLICY_PREFIX) or handler.request_streaming:
            return handler
        wrapped = self._wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped


def as_gateway_error(error: BaseException) -> GatewayError | None:
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, grpc.aio.AioRpcError):
        return from_backend(error)
    return None


class ErrorMapping(BehaviorWrapper):
    """GatewayError and backend errors become the client's status (with their details); any other
    exception is logged and reported as INTERNAL without leaking its text."""

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def mapped(request: Any, context: Context) -> Any:
            try:
                return await behavior(request, context)
            except (GatewayError, grpc.aio.AioRpcError) as error:
                mapped_error = as_gateway_error(error)
                assert mapped_error is not None
                await abort_with(context, mapped_error)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                log.exception("unexpected failure in %s", method)
                await abort_with(
                    context, GatewayError(grpc.StatusCode.INTERNAL, f"internal error in {method}")
                )

        return mapped

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def mapped(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except (GatewayError, grpc.aio.AioRpcError) as error:
                mapped_error = as_gateway_error(error)
                assert mapped_error is not None
                await abort_with(context, mapped_error)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                log.exception("unexpected failure in %s", method)
                await abort_with(
                    context, GatewayError(grpc.StatusCode.INTERNAL, f"internal error in {method}")
                )

        return mapped
