"""OpenTelemetry traces: a server span per call on the gateway (continuing a W3C `traceparent`
sent by the client), and the trace context passed on to the backends in the gRPC metadata by the
instrumentation's client interceptors. Spans are exported over OTLP/gRPC when an endpoint is
configured.

The server side is a wrapper of our own rather than the instrumentation's aio server interceptor:
that one keeps the span's context attached across the yields of a stream, and a stream the client
drops is closed from another task, where detaching fails (and is logged as an error). Here the
context is attached only while the inner behaviour runs and detached before each yield."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.gateway.interceptors import BehaviorWrapper, Context, StreamBehavior, UnaryBehavior

log = logging.getLogger(__name__)

# Health checks and reflection are noise in traces.
_TRACED = filters.negate(
    filters.any_of(filters.service_prefix("grpc.health"), filters.service_prefix("grpc.reflection"))
)


def setup_tracing(service_name: str, otlp_endpoint: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True), schedule_delay_millis=500
            )
        )
        log.info("exporting traces to %s", otlp_endpoint)
    trace.set_tracer_provider(provider)
    return provider


def client_interceptors(provider: TracerProvider) -> Sequence[Any]:
    interceptors: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=_TRACED
    )
    return interceptors


class Tracing(BehaviorWrapper):
    """A SERVER span per call, child of the client's traceparent when it sent one."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("services.gateway")

    def _start(self, method: str, context: Context) -> Span:
        carrier = {
            key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
        }
        service, _, name = method.lstrip("/").partition("/")
        return self._tracer.start_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    @staticmethod
    def _finish(span: Span, context: Context, error: BaseException | None) -> None:
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        if isinstance(error, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def traced(request: Any, context: Context) -> Any:
            span = self._start(method, context)
            error: BaseException | None = None
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                otel_context.detach(token)
                self._finish(span, context, error)

        return traced

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def traced(request: Any, context: Context) -> AsyncIterator[Any]:
            span = self._start(method, context)
            error: BaseException | None = None
            inner = behavior(request, context).__aiter__()
            try:
                while True:
                    token = otel_context.attach(trace.set_span_in_context(span))
                    try:
                        item = await inner.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(token)
                    yield item
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(span, context, error)
                if isinstance(error, GeneratorExit):
                    # Close the inner chain now, so that the backend call is cancelled at once.
                    close = getattr(inner, "aclose", None)
                    if close is not None:
                        await close()

        return traced
