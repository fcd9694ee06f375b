"""One trace across the tiers: a trace id sent in `traceparent` (over REST through Envoy, or as
gRPC metadata) appears on the spans of the gateway and of the backend that served the call, and
each backend's SERVER span is the child of the gateway's CLIENT span for that call. Every tier
exports to the OTLP receiver in this process: the gateway and the embedder with --otlp-endpoint,
the generator through the standard OTEL_EXPORTER_OTLP_ENDPOINT variable (as a URL)."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx2
import pytest
from inference.v1 import (
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from services.common import telemetry
from tests.fixtures_embedder import EmbedderHandle, start_embedder
from tests.fixtures_gateway import (
    EnvoyService,
    OtlpCollector,
    SpanRecord,
    descriptor_for_envoy,
    start_envoy,
    start_gateway,
)
from tests.fixtures_generator import GeneratorService, start_generator
from tests.stack import ServiceProcess

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
DETACH_FAILURE = "Failed to detach context"


@dataclass
class TracedStack:
    generator: GeneratorService
    embedder: EmbedderHandle
    gateway: ServiceProcess
    gateway_address: str
    envoy: EnvoyService


@pytest.fixture(scope="module")
def traced_stack(
    otlp_collector: OtlpCollector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TracedStack]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        generator_start = pool.submit(
            start_generator, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{otlp_collector.address}"}
        )
        embedder_start = pool.submit(start_embedder, "--otlp-endpoint", otlp_collector.address)
        generator, embedder = generator_start.result(), embedder_start.result()
    gateway, address, _ = start_gateway(
        generator.address,
        embedder.address,
        ("--otlp-endpoint", otlp_collector.address),
        name="gateway-traced",
    )
    envoy = start_envoy(
        address,
        tmp_path_factory.mktemp("envoy-traced"),
        descriptor=descriptor_for_envoy(),
        otlp_endpoint=otlp_collector.address,
    )
    yield TracedStack(generator, embedder, gateway, address, envoy)
    envoy.process.stop()
    gateway.stop()
    embedder.process.stop()
    generator.stop()


@pytest.fixture(scope="module")
def rest(traced_stack: TracedStack) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=traced_stack.envoy.url, timeout=120) as client:
        yield client


def running_requests(generator_address: str) -> int:
    with grpc.insecure_channel(generator_address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    running: int = reply.components[0].requests_running
    return running


def new_traceparent() -> tuple[str, str, str]:
    """(trace id, the caller's span id, the traceparent header carrying both)."""
    trace_id, parent = uuid.uuid4().hex, secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def trace_spans(
    collector: OtlpCollector, trace_id: str, backend: str, through_envoy: bool = False
) -> list[SpanRecord]:
    """The spans of `trace_id` once the gateway's SERVER and CLIENT spans, the backend's SERVER
    span and (for REST) Envoy's span have all arrived (exporters batch their spans)."""
    wanted = {("gateway", SERVER), ("gateway", CLIENT), (backend, SERVER)}
    if through_envoy:
        wanted.add(("envoy", SERVER))

    def complete(spans: list[SpanRecord]) -> bool:
        return wanted <= {(span.service, span.kind) for span in spans if span.trace_id == trace_id}

    return [span for span in collector.wait_for(complete, timeout=30) if span.trace_id == trace_id]


def assert_one_trace(
    spans: list[SpanRecord], caller_span_id: str, gateway_method: str, backend: str, backend_method: str
) -> SpanRecord:
    """The chain caller -> gateway SERVER -> gateway CLIENT -> backend SERVER; returns the
    backend's span."""
    gateway_server = [s for s in spans if s.service == "gateway" and s.kind == SERVER]
    assert len(gateway_server) == 1, spans
    assert gateway_server[0].name == gateway_method
    assert gateway_server[0].parent_span_id == caller_span_id, spans
    served = [s for s in spans if s.service == backend and s.kind == SERVER]
    assert len(served) == 1, spans
    assert served[0].name == backend_method
    by_id = {span.span_id: span for span in spans}
    client = by_id.get(served[0].parent_span_id)
    assert client is not None, f"the {backend} span's parent is not in the trace: {spans}"
    assert (client.service, client.kind, client.name) == ("gateway", CLIENT, backend_method)
    assert client.parent_span_id == gateway_server[0].span_id, spans
    return served[0]


def envoy_span_id(spans: list[SpanRecord], caller_span_id: str) -> str:
    """Envoy's span, a child of the REST caller's; the gateway's span continues from it."""
    edge = [s for s in spans if s.service == "envoy"]
    assert len(edge) == 1, spans
    assert edge[0].parent_span_id == caller_span_id, spans
    return edge[0].span_id


def status_codes(spans: list[SpanRecord]) -> set[int]:
    return {span.grpc_code for span in spans}


def test_a_rest_generate_through_envoy_is_one_trace_over_envoy_gateway_and_generator(
    rest: httpx2.Client, otlp_collector: OtlpCollector
) -> None:
    trace_id, parent, traceparent = new_traceparent()
    reply = rest.post(
        "/generate",
        json={"prompt": f"Trace {trace_id}", "parameters": {"max_new_tokens": 2}},
        headers={"traceparent": traceparent},
    )
    assert reply.status_code == 200, reply.text
    spans = trace_spans(otlp_collector, trace_id, "generator", through_envoy=True)
    method = "/inference.v1.GenerationService/Generate"
    assert_one_trace(spans, envoy_span_id(spans, parent), method, "generator", method)
    assert status_codes([s for s in spans if s.service != "envoy"]) == {grpc.StatusCode.OK.value[0]}, spans


def test_a_rest_embedding_through_envoy_is_one_trace_over_envoy_gateway_and_embedder(
    rest: httpx2.Client, otlp_collector: OtlpCollector
) -> None:
    trace_id, parent, traceparent = new_traceparent()
    reply = rest.post(
        "/embeddings", json={"input": f"Trace {trace_id}"}, headers={"traceparent": traceparent}
    )
    assert reply.status_code == 200, reply.text
    spans = trace_spans(otlp_collector, trace_id, "embedder", through_envoy=True)
    method = "/inference.v1.EmbeddingService/Embed"
    assert_one_trace(spans, envoy_span_id(spans, parent), method, "embedder", method)


def test_a_grpc_stream_with_traceparent_metadata_is_one_trace_over_gateway_and_generator(
    traced_stack: TracedStack, otlp_collector: OtlpCollector
) -> None:
    trace_id, parent, traceparent = new_traceparent()
    with grpc.insecure_channel(traced_stack.gateway_address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        replies = list(
            stub.GenerateStream(
                generation_pb2.GenerateStreamRequest(
                    prompt=f"Trace {trace_id}", parameters=common_pb2.SamplingParameters(max_new_tokens=3)
                ),
                timeout=120,
                metadata=(("traceparent", traceparent),),
            )
        )
    assert replies
    spans = trace_spans(otlp_collector, trace_id, "generator")
    method = "/inference.v1.GenerationService/GenerateStream"
    assert_one_trace(spans, parent, method, "generator", method)
    assert status_codes(spans) == {grpc.StatusCode.OK.value[0]}, spans


def test_a_grpc_embed_with_traceparent_metadata_reaches_the_embedder_span(
    traced_stack: TracedStack, otlp_collector: OtlpCollector
) -> None:
    trace_id, parent, traceparent = new_traceparent()
    request = embedding_pb2.EmbedRequest()
    request.input.string_value = f"Trace {trace_id}"
    with grpc.insecure_channel(traced_stack.gateway_address) as channel:
        reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
            request, timeout=60, metadata=(("traceparent", traceparent),)
        )
    assert len(reply.data) == 1
    spans = trace_spans(otlp_collector, trace_id, "embedder")
    method = "/inference.v1.EmbeddingService/Embed"
    assert_one_trace(spans, parent, method, "embedder", method)


def test_a_dropped_stream_still_ends_its_spans_without_context_errors(
    traced_stack: TracedStack, otlp_collector: OtlpCollector
) -> None:
    trace_id, parent, traceparent = new_traceparent()
    with grpc.insecure_channel(traced_stack.gateway_address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        call = stub.GenerateStream(
            # Long enough to be running when it is dropped, at any decode speed.
            generation_pb2.GenerateStreamRequest(
                prompt=f"Count slowly {trace_id}",
                parameters=common_pb2.SamplingParameters(max_new_tokens=2000),
            ),
            timeout=120,
            metadata=(("traceparent", traceparent),),
        )
        next(call)
        assert running_requests(traced_stack.generator.address) == 1
        call.cancel()
    # The spans are exported only when they end: their arrival shows the drop ended both.
    spans = trace_spans(otlp_collector, trace_id, "generator")
    method = "/inference.v1.GenerationService/GenerateStream"
    assert_one_trace(spans, parent, method, "generator", method)
    assert status_codes(spans) == {grpc.StatusCode.CANCELLED.value[0]}, spans
    for process in (traced_stack.gateway, traced_stack.generator.process):
        assert DETACH_FAILURE not in process.log_tail(400), process.log_tail(400)
    # The traced stream still frees its batch slot (at the engine's next step).
    deadline = time.monotonic() + 5
    running = running_requests(traced_stack.generator.address)
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = running_requests(traced_stack.generator.address)
    assert running == 0


def test_the_collector_comes_from_the_flag_then_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in telemetry.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert telemetry.otlp_endpoint("") == ""
    assert telemetry.server_interceptors("embedder", "") == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert telemetry.otlp_endpoint("") == "http://collector:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert telemetry.otlp_endpoint("") == "http://traces:4317"
    assert telemetry.otlp_endpoint("flag:4317") == "flag:4317"
