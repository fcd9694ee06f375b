"""OpenTelemetry traces for every service: a SERVER span per call that continues the caller's W3C trace
context (`traceparent`, `tracestate` metadata), exported over OTLP/gRPC to --otlp-endpoint, else to
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from services.common.interceptors import (
    BehaviorWrapper,
    Context,
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    final_code,
)

log = logging.getLogger(__name__)


# Health checks and reflection are noise in traces.
UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_endpoint(configured: str) -> str:
    """The collector to export to: the service's own setting first, then the standard variables."""
    if configured:
        return configured
    return next((os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)), "")


def setup_tracing(service_name: str, endpoint: str) -> TracerProvider:
    """A provider for `service_name` (made the global one), exporting to `endpoint` when set."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # host:port has no scheme to say whether TLS is wanted; collectors inside a deployment
        # speak plaintext, and an https:// URL still gets TLS.
        insecure = None if "://" in endpoint else True
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, insecure=insecure), schedule_delay_millis=500
            )
        )
        log.info("exporting traces to %s", endpoint)
    trace.set_tracer_provider(provider)
    return provider


def server_interceptors(service_name: str, configured_endpoint: str) -> list[grpc.aio.ServerInterceptor]:
    """The tracing interceptor of a backend, or none when no collector is configured: a backend
    calls no one, so a span that is not exported would be work for nothing."""
    endpoint = otlp_endpoint(configured_endpoint)
    if not endpoint:
        return []
    return [tracing_interceptor(setup_tracing(service_name, endpoint).get_tracer(f"services.{service_name}"))]


def rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def end_span(span: Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def is_traced(method: str) -> bool:
    return not method.startswith(UNTRACED_PREFIXES)


def tracing_interceptor(tracer: Tracer) -> grpc.aio.ServerInterceptor:
    """Puts every unary-request call (health checks and reflection aside) in a SERVER span."""
    return WrappingInterceptor([ServerSpans(tracer)], applies_to=is_traced)


class ServerSpans(BehaviorWrapper):
    """Wraps a method's behaviour in a SERVER span, child of the caller's trace context."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def _start(self, method: str, context: Context) -> Span:
        carrier = {
            key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
        }
        return self._tracer.start_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=rpc_attributes(method),
        )

    @staticmethod
    def _finish(span: Span, context: Context, error: BaseException | None) -> None:
        end_span(span, final_code(context, error))

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
                    # Close the inner chain now, so that what it holds (a batch slot, a backend
                    # stream) is released at once rather than when it is garbage-collected.
                    close = getattr(inner, "aclose", None)
                    if close is not None:
                        await close()

        return traced
