"""The gateway's part of tracing: a CLIENT span per backend call, child of the gateway's SERVER span, whose
W3C `traceparent` goes to the backend in the gRPC metadata; a span ends when its call does, however it
ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind, Tracer

from services.common.telemetry import UNTRACED_PREFIXES, end_span, rpc_attributes

Continuation: TypeAlias = "Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]"


class _ClientSpans:
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        # The tasks that read a finished call's status; held so that they are not collected.
        self._pending: set[asyncio.Future[grpc.StatusCode]] = set()

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[Span | None, grpc.aio.ClientCallDetails]:
        raw: str | bytes = details.method
        method = raw.decode() if isinstance(raw, bytes) else raw
        if method.startswith(UNTRACED_PREFIXES):
            return None, details
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
        return span, grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def _end_when_done(self, span: Span, call: grpc.aio.Call) -> None:
        def read_status(finished: grpc.aio.Call) -> None:
            if finished.cancelled():
                end_span(span, grpc.StatusCode.CANCELLED)
                return
            # The status is known once the call is done, but grpc.aio only hands it out to an await.
            status = asyncio.ensure_future(finished.code())
            self._pending.add(status)
            status.add_done_callback(lambda task: self._end(span, task))

        call.add_done_callback(read_status)

    def _end(self, span: Span, status: asyncio.Future[grpc.StatusCode]) -> None:
        self._pending.discard(status)
        failed = status.cancelled() or status.exception() is not None
        end_span(span, grpc.StatusCode.UNKNOWN if failed else status.result())

    async def call(
        self, continuation: Continuation, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = self._start(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
        except BaseException:
            end_span(span, grpc.StatusCode.UNKNOWN)
            raise
        self._end_when_done(span, call)
        return call


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, spans: _ClientSpans) -> None:
        self._spans = spans

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._spans.call(continuation, client_call_details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, spans: _ClientSpans) -> None:
        self._spans = spans

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._spans.call(continuation, client_call_details, request)


def client_interceptors(provider: TracerProvider) -> Sequence[grpc.aio.ClientInterceptor]:
    spans = _ClientSpans(provider.get_tracer("services.gateway"))
    return [_UnaryUnary(spans), _UnaryStream(spans)]
