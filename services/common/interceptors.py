"""One way to wrap a gRPC method's behaviour, shared by every cross-cutting concern (traces,
metrics, auth, limits, error mapping): a `BehaviorWrapper` says what to do around one call, and
`WrappingInterceptor` applies a list of them to each method once and reuses the result."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
import grpc.aio

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:  # grpc's classes are generic only in its stubs
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
UnaryBehavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
StreamBehavior: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


class BehaviorWrapper:
    """Wraps unary-request behaviours; subclasses override `unary` and `stream` (each receives
    the method name and the inner behaviour)."""

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        return behavior

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        return behavior


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies `wrappers` (outermost first) to every unary-request method that `applies_to`
    accepts, once per method; later calls reuse the wrapped handler."""

    def __init__(self, wrappers: Sequence[BehaviorWrapper], applies_to: Callable[[str], bool]) -> None:
        self._wrappers = list(wrappers)
        self._applies_to = applies_to
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
        if handler is None or handler.request_streaming or not self._applies_to(method):
            return handler
        wrapped = self._wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped
