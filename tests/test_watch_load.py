"""WatchLoad over real processes: a generator reports its batch and token budget (followed by the
gateway's follow_load), the count rises while a stream runs, and the stream ends cleanly when the
generator drains; the embedder reports its batch size and models."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from inference.v1 import generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc

from services.embedder.config import DEFAULT_MODEL_NAME
from services.gateway.routing import LoadReport, follow_load
from tests.fixtures_generator import GeneratorService, start_generator

CAPACITY = 6
TOKEN_BUDGET = 20_000
WAIT_S = 60.0


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    outstanding: int = 0
    load_report: LoadReport | None = None


@pytest.fixture(scope="module")
def generator() -> Iterator[GeneratorService]:
    """A generator of this module's own: the last test stops it."""
    service = start_generator(
        [
            "--max-running-sequences",
            str(CAPACITY),
            "--max-total-tokens",
            str(TOKEN_BUDGET),
            "--model-id",
            "watched",
        ]
    )
    yield service
    service.stop()


async def until(condition: object, replica: Replica) -> LoadReport:
    """The replica's report once `condition(report)` holds (within WAIT_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        report = replica.load_report
        if report is not None and condition(report):  # type: ignore[operator]
            return report
        await asyncio.sleep(0.02)
    raise AssertionError(f"no such report within {WAIT_S} s; last {replica.load_report}")


async def test_follow_load_tracks_a_running_stream(generator: GeneratorService) -> None:
    async with grpc.aio.insecure_channel(generator.address) as channel:
        replica = Replica(generator.address, channel)
        follower = asyncio.create_task(follow_load(replica, "generator"))
        try:
            idle = await until(lambda r: r.running == 0, replica)
            assert idle == LoadReport(running=0, waiting=0, capacity=CAPACITY, free_kv_tokens=TOKEN_BUDGET)
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateStreamRequest(prompt="Once upon a time")
            request.parameters.max_new_tokens = 400
            request.parameters.temperature = 0
            call = stub.GenerateStream(request)
            await call.read()  # the first token: the request is in the batch
            busy = await until(lambda r: r.running == 1, replica)
            assert busy.free_kv_tokens < TOKEN_BUDGET
            call.cancel()
            await until(lambda r: r.running == 0 and r.free_kv_tokens == TOKEN_BUDGET, replica)
        finally:
            follower.cancel()


async def test_a_report_names_the_models_and_ends_when_the_generator_drains(
    generator: GeneratorService,
) -> None:
    async with grpc.aio.insecure_channel(generator.address) as channel:
        stub = info_pb2_grpc.InfoServiceStub(channel)
        call = stub.WatchLoad(info_pb2.WatchLoadRequest(min_interval_ms=20))
        first = await asyncio.wait_for(call.read(), WAIT_S)
        assert isinstance(first, info_pb2.WatchLoadResponse)
        assert list(first.models) == ["watched"] and first.capacity == CAPACITY
        generator.process.send_signal(signal.SIGTERM)

        async def rest() -> None:
            while await call.read() is not grpc.aio.EOF:
                pass

        await asyncio.wait_for(rest(), WAIT_S)
        assert await call.code() == grpc.StatusCode.OK


async def test_the_embedder_reports_its_batch_and_models(embedder_address: str) -> None:
    async with grpc.aio.insecure_channel(embedder_address) as channel:
        call = info_pb2_grpc.InfoServiceStub(channel).WatchLoad(info_pb2.WatchLoadRequest())
        first = await asyncio.wait_for(call.read(), WAIT_S)
        call.cancel()
    assert isinstance(first, info_pb2.WatchLoadResponse)
    assert first.capacity == 64 and first.free_kv_tokens == 0
    assert DEFAULT_MODEL_NAME in first.models  # loaded at start
