"""The common error-mapping and request-metrics interceptor, on a loopback grpc.aio server with a
fake servicer, and each tier's mapping of its domain exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from inference.v1 import generation_pb2, generation_pb2_grpc
from prometheus_client import REGISTRY

from services.common.errors import (
    MAX_WIRE_BYTES,
    FailureMapping,
    RpcFailure,
    clip,
    invalid_argument,
    wire_bytes,
)
from services.common.interceptors import RequestObserver, serving_interceptor
from services.embedder import errors as embedder_errors
from services.embedder import exceptions as embedder
from services.embedder.metrics import EmbedderRequests
from services.gateway import errors as gateway_errors
from services.gateway.metrics import GatewayRequests, GatewayStats
from services.generator import engine as generator
from services.generator import errors as generator_errors
from services.generator.metrics import GeneratorRequests, RequestTally

GENERATE = "/inference.v1.GenerationService/Generate"
STREAM = "/inference.v1.GenerationService/GenerateStream"


@dataclass
class Recorder:
    """A RequestObserver that keeps what it was told."""

    started: list[str] = field(default_factory=list)
    finished: list[tuple[str, grpc.StatusCode]] = field(default_factory=list)

    def on_start(self, method: str) -> None:
        self.started.append(method)

    def on_finish(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        assert seconds >= 0
        self.finished.append((method, code))


class RecordingObserver:
    def __init__(self, recorder: Recorder, tier: RequestObserver | None = None) -> None:
        self._recorder = recorder
        self._tier = tier

    def started(self, method: str) -> None:
        self._recorder.on_start(method)
        if self._tier is not None:
            self._tier.started(method)

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._recorder.on_finish(method, code, seconds)
        if self._tier is not None:
            self._tier.finished(method, code, seconds)


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Raises `error` (when set) from Generate, and from GenerateStream before its first message
    when the prompt is "before", after it otherwise; "hang" streams until the client goes."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.GenerateResponse:
        if self.error is not None:
            raise self.error
        return generation_pb2.GenerateResponse(generated_text="fine")

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        if self.error is not None and request.prompt == "before":
            raise self.error
        yield generation_pb2.GenerateStreamResponse(request_id="first")
        if request.prompt == "hang":
            await asyncio.sleep(60)
        if self.error is not None:
            raise self.error
        yield generation_pb2.GenerateStreamResponse(request_id="second")


@dataclass
class Served:
    stub: generation_pb2_grpc.GenerationServiceAsyncStub
    fake: FakeGeneration
    recorder: Recorder


@asynccontextmanager
async def serving(mapping: FailureMapping, tier: RequestObserver | None = None) -> AsyncIterator[Served]:
    recorder = Recorder()
    fake = FakeGeneration()  # type: ignore[abstract]  # Chat and the Solve RPCs are never called
    server = grpc.aio.server(interceptors=[serving_interceptor(RecordingObserver(recorder, tier), mapping)])
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(generation_pb2_grpc.GenerationServiceStub(channel), fake, recorder)
    finally:
        await channel.close()
        await server.stop(None)


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)
    assert status is not None, "the status carries no google.rpc details"
    return status


def detail(status: status_pb2.Status, kind: type[Message]) -> Any:
    for holder in status.details:
        if holder.Is(kind.DESCRIPTOR):
            found = kind()
            holder.Unpack(found)
            return found
    raise AssertionError(f"no {kind.__name__} in {status}")


async def failed_unary(served: Served, error: BaseException) -> grpc.aio.AioRpcError:
    served.fake.error = error
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.Generate(generation_pb2.GenerateRequest(prompt="x"), timeout=10)
    return raised.value


async def failed_stream(served: Served, error: BaseException, when: str) -> tuple[int, grpc.aio.AioRpcError]:
    served.fake.error = error
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in served.stub.GenerateStream(
            generation_pb2.GenerateStreamRequest(prompt=when), timeout=10
        ):
            received += 1
    return received, raised.value


# --- the interceptor, over the wire ---------------------------------------------------------


async def test_a_unary_domain_error_becomes_its_status_with_details_and_is_counted() -> None:
    async with serving(generator_errors.MAPPING) as served:
        error = await failed_unary(served, generator.InvalidRequest([("top_p", "must be in (0, 1]")]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "top_p: must be in (0, 1]"
        violation = detail(status_of(error), error_details_pb2.BadRequest).field_violations[0]
        assert (violation.field, violation.description) == ("top_p", "must be in (0, 1]")
        assert served.recorder.started == [GENERATE]
        assert served.recorder.finished == [(GENERATE, grpc.StatusCode.INVALID_ARGUMENT)]


async def test_a_successful_call_is_counted_ok() -> None:
    async with serving(generator_errors.MAPPING) as served:
        reply = await served.stub.Generate(generation_pb2.GenerateRequest(prompt="x"), timeout=10)
        assert reply.generated_text == "fine"
        assert served.recorder.finished == [(GENERATE, grpc.StatusCode.OK)]


@pytest.mark.parametrize("when", ["before", "during"])
async def test_a_stream_error_maps_the_same_before_or_after_its_first_message(when: str) -> None:
    async with serving(generator_errors.MAPPING) as served:
        overloaded = generator.OverCapacity("the queue is full", 2.0, "QUEUE_FULL")
        received, error = await failed_stream(served, overloaded, when)
        assert received == (0 if when == "before" else 1)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "the queue is full"
        status = status_of(error)
        assert detail(status, error_details_pb2.RetryInfo).retry_delay.seconds == 2
        info = detail(status, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain) == ("QUEUE_FULL", generator_errors.DOMAIN)
        assert served.recorder.finished == [(STREAM, grpc.StatusCode.RESOURCE_EXHAUSTED)]


async def test_an_unmapped_error_is_internal_and_does_not_leak_its_text() -> None:
    async with serving(generator_errors.MAPPING) as served:
        error = await failed_unary(served, RuntimeError("secret path /etc/key"))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (error.details() or "")
        received, streamed = await failed_stream(served, KeyError("secret"), "during")
        assert received == 1 and streamed.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (streamed.details() or "")
        assert [code for _, code in served.recorder.finished] == [grpc.StatusCode.INTERNAL] * 2


async def test_a_client_that_leaves_a_stream_is_counted_cancelled() -> None:
    async with serving(generator_errors.MAPPING) as served:
        call = served.stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt="hang"), timeout=10)
        await call.read()
        call.cancel()
        for _ in range(100):
            if served.recorder.finished:
                break
            await asyncio.sleep(0.02)
        assert served.recorder.finished == [(STREAM, grpc.StatusCode.CANCELLED)]


# --- each tier's metrics, recorded by the interceptor ---------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_generator_counts_by_rpc_and_outcome_and_refusals_apart() -> None:
    tally = RequestTally()
    observer = GeneratorRequests(tally)
    labels = {"rpc": "Generate", "outcome": "unavailable"}
    before = sample("generator_requests_total", **labels)
    timed = sample("generator_request_seconds_count", rpc="Generate")
    async with serving(generator_errors.MAPPING, observer) as served:
        error = await failed_unary(served, generator.ShuttingDown("shutting down"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        served.fake.error = None
        await served.stub.Generate(generation_pb2.GenerateRequest(prompt="x"), timeout=10)
    assert sample("generator_requests_total", **labels) == before + 1
    assert sample("generator_request_seconds_count", rpc="Generate") == timed + 2
    # Both calls received; the refusal is a rejection, not a failure of an admitted request.
    assert (tally.received, tally.rejected) == (2, {"unavailable": 1})


async def test_the_embedder_counts_by_method_and_code() -> None:
    labels = {"method": "GenerateStream", "code": "NOT_FOUND"}
    before = sample("embedder_requests_total", **labels)
    timed = sample("embedder_request_seconds_count", method="GenerateStream")
    async with serving(embedder_errors.MAPPING, EmbedderRequests()) as served:
        _, error = await failed_stream(served, embedder.ModelNotFound("nope", "not allowed"), "before")
        assert error.code() == grpc.StatusCode.NOT_FOUND
    assert sample("embedder_requests_total", **labels) == before + 1
    assert sample("embedder_request_seconds_count", method="GenerateStream") == timed + 1


async def test_the_gateway_counts_by_full_method_key_and_code() -> None:
    stats = GatewayStats()
    labels = {"method": GENERATE, "key": "anonymous", "code": "NOT_FOUND"}
    before = sample("gateway_requests_total", **labels)
    async with serving(gateway_errors.MAPPING, GatewayRequests(stats)) as served:
        error = await failed_unary(served, gateway_errors.not_found("model", "nope", ["tiny"]))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert detail(status_of(error), error_details_pb2.ResourceInfo).resource_name == "nope"
    assert sample("gateway_requests_total", **labels) == before + 1
    assert (stats.total, stats.failed, stats.running) == (1, 1, 0)


# --- each tier's mapping of its domain exceptions -------------------------------------------


def mapped(mapping: FailureMapping, error: BaseException) -> RpcFailure:
    failure = mapping.failure_of(error)
    assert failure is not None, error
    return failure


def reasons(failure: RpcFailure) -> list[str]:
    return [d.reason for d in failure.details if isinstance(d, error_details_pb2.ErrorInfo)]


def test_the_generator_maps_every_engine_refusal() -> None:
    mapping = generator_errors.MAPPING
    invalid = mapped(mapping, generator.InvalidRequest([("stop", "too many")]))
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    over = mapped(mapping, generator.OverCapacity("full", 0.5, "TOO_MANY_TOKENS"))
    assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED and reasons(over) == ["TOO_MANY_TOKENS"]
    down = mapped(mapping, generator.ShuttingDown("draining"))
    assert down.code == grpc.StatusCode.UNAVAILABLE and reasons(down) == ["SHUTTING_DOWN"]
    loading = mapped(mapping, generator.ModelLoading("the model is still loading"))
    assert loading.code == grpc.StatusCode.UNAVAILABLE and reasons(loading) == ["MODEL_LOADING"]
    missing = mapped(mapping, generator.ModelNotFound("gpt-9", "SmolLM2-135M-Instruct"))
    assert missing.code == grpc.StatusCode.NOT_FOUND and "gpt-9" in missing.message
    assert mapping.failure_of(ValueError("x")) is None


def test_the_embedder_maps_every_engine_exception() -> None:
    mapping = embedder_errors.MAPPING
    cases: list[tuple[embedder.EmbedderError, grpc.StatusCode, list[str]]] = [
        (embedder.InvalidInput("input", "empty"), grpc.StatusCode.INVALID_ARGUMENT, []),
        (embedder.ModelNotFound("m", "no"), grpc.StatusCode.NOT_FOUND, ["MODEL_NOT_FOUND"]),
        (embedder.ModelUnavailable("m", "bad"), grpc.StatusCode.FAILED_PRECONDITION, ["MODEL_NOT_LOADABLE"]),
        (embedder.ModelTooLarge("m", "big"), grpc.StatusCode.RESOURCE_EXHAUSTED, ["MODEL_TOO_LARGE"]),
        (embedder.Overloaded("busy", 0.25), grpc.StatusCode.RESOURCE_EXHAUSTED, ["OVERLOADED"]),
        (embedder.ShuttingDown("draining"), grpc.StatusCode.UNAVAILABLE, ["SHUTTING_DOWN"]),
        (embedder.EmbedderError("odd"), grpc.StatusCode.INTERNAL, []),
    ]
    for error, code, expected in cases:
        failure = mapped(mapping, error)
        assert (failure.code, reasons(failure)) == (code, expected), error
    unavailable = mapped(mapping, embedder.ModelUnavailable("m", "bad"))
    assert any(isinstance(d, error_details_pb2.PreconditionFailure) for d in unavailable.details)


def test_the_most_specific_registered_class_decides() -> None:
    class Base(Exception):
        pass

    class Special(Base):
        pass

    mapping = FailureMapping()
    mapping.register(Base, lambda _: RpcFailure(grpc.StatusCode.INTERNAL, "base"))
    mapping.register(Special, lambda _: RpcFailure(grpc.StatusCode.ABORTED, "special"))
    assert mapped(mapping, Special()).code == grpc.StatusCode.ABORTED
    assert mapped(mapping, Base()).code == grpc.StatusCode.INTERNAL
    own = RpcFailure(grpc.StatusCode.NOT_FOUND, "as raised")
    assert mapping.failure_of(own) is own


def test_the_gateway_passes_a_backends_status_and_details_on() -> None:
    """The gateway's one rule: a backend's failure reaches the client with its code, message and
    google.rpc details (here a PreconditionFailure), not as the gateway's own INTERNAL."""
    precondition = error_details_pb2.PreconditionFailure()
    precondition.violations.add(type="MODEL", subject="tiny", description="not loaded")
    status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="not loaded")
    status.details.add().Pack(precondition)
    backend = grpc.aio.AioRpcError(
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((gateway_errors.STATUS_DETAILS_KEY, status.SerializeToString())),
        "not loaded",
    )
    failure = mapped(gateway_errors.MAPPING, backend)
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION and failure.message == "not loaded"
    (detail,) = failure.details
    assert isinstance(detail, error_details_pb2.PreconditionFailure)
    assert detail.violations[0].subject == "tiny"


# --- refusals that quote the request: bounded in bytes on the wire ---------------------------


@pytest.mark.parametrize("text", ["é", "🙂", "\u202e", "%", "a"])
def test_clip_counts_utf8_bytes_and_never_cuts_a_character(text: str) -> None:
    clipped = clip(text * 500, 100)
    assert len(clipped.encode()) <= 100
    assert clipped.endswith("\u2026") and clipped[:-1] == text * len(clipped[:-1])


@pytest.mark.parametrize("text", ["é" * 400, "🙂" * 400, "%\x01" * 400])
def test_eight_non_ascii_violations_fit_the_wire_bound(text: str) -> None:
    failure = invalid_argument([(f"messages[{index}].role", f"got {text!r}") for index in range(8)])
    assert wire_bytes(failure.to_status()) <= MAX_WIRE_BYTES
    assert failure.message.startswith("messages[0].role: got") and failure.message.endswith("more")


@pytest.mark.parametrize("text", ["é", "🙂"])
async def test_a_huge_non_ascii_message_reaches_the_client_with_its_own_code(text: str) -> None:
    """Regression: a status of ~18 KB of trailers reached gRPC clients as RESOURCE_EXHAUSTED
    (their 16 KiB metadata limit), which REST clients saw as a 429 and retried for ever."""
    huge = RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, text * 9000, (error_details_pb2.BadRequest(),))
    async with serving(generator_errors.MAPPING) as served:
        error = await failed_unary(served, huge)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = error.details() or ""
        assert message.startswith(text * 10) and message.endswith("\u2026")
        assert detail(status_of(error), error_details_pb2.BadRequest) == error_details_pb2.BadRequest()
