"""One way to wrap a gRPC method's behaviour, shared by every cross-cutting concern (metrics,
auth, limits, error mapping): a `BehaviorWrapper` says what to do around one call, and
`WrappingInterceptor` applies a list of them to each method once and reuses the result.
`serving_interceptor` is what every tier installs: request metrics, then error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeAlias, cast

import grpc
import grpc.aio

from services.common.errors import FailureMapping, RpcFailure

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:  # grpc's classes are generic only in its stubs
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
UnaryBehavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
StreamBehavior: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

log = logging.getLogger(__name__)

# The project's own services; health checks and reflection pass untouched.
INFERENCE_PREFIX = "/inference.v1."


def is_inference_method(method: str) -> bool:
    return method.startswith(INFERENCE_PREFIX)


def rpc_name(method: str) -> str:
    """`Generate` for `/inference.v1.GenerationService/Generate`."""
    return method.rsplit("/", 1)[-1]


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


class ErrorMapping(BehaviorWrapper):
    """Exceptions `mapping` knows become the call's status with their details, before or during
    a stream; any other exception is logged and reported as INTERNAL without leaking its text."""

    def __init__(self, mapping: FailureMapping) -> None:
        self._mapping = mapping

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def mapped(request: Any, context: Context) -> Any:
            try:
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(method, context, error)

        return mapped

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def mapped(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(method, context, error)

        return mapped

    async def _abort(self, method: str, context: Context, error: Exception) -> NoReturn:
        failure = self._mapping.failure_of(error)
        if failure is None:
            log.exception("unexpected failure in %s", method)
            failure = RpcFailure(grpc.StatusCode.INTERNAL, f"internal error in {method}")
        await failure.abort(context)


class RequestObserver(Protocol):
    """A tier's request metrics: told when a call starts and how it ended."""

    def started(self, method: str) -> None: ...

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


def final_code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: the one it aborted with, CANCELLED when the client went."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


class RequestMetrics(BehaviorWrapper):
    """Reports every call's start, final status and duration (to its last message) to `observer`."""

    def __init__(self, observer: RequestObserver) -> None:
        self._observer = observer

    def _finish(self, method: str, started: float, context: Context, error: BaseException | None) -> None:
        self._observer.finished(method, final_code(context, error), time.perf_counter() - started)

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def measured(request: Any, context: Context) -> Any:
            self._observer.started(method)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(method, started, context, error)

        return measured

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def measured(request: Any, context: Context) -> AsyncIterator[Any]:
            self._observer.started(method)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(method, started, context, error)

        return measured


def serving_interceptor(
    observer: RequestObserver, mapping: FailureMapping, policies: Sequence[BehaviorWrapper] = ()
) -> WrappingInterceptor:
    """The interceptor every tier installs on its inference services: metrics outermost (they see
    the final status), then error mapping (it maps what `policies`, innermost, raise too)."""
    wrappers: list[BehaviorWrapper] = [RequestMetrics(observer), ErrorMapping(mapping), *policies]
    return WrappingInterceptor(wrappers, applies_to=is_inference_method)
