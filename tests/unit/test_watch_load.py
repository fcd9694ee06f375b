"""The generator's WatchLoad over an engine on a fake runner: a report at once, a new one when a
figure changes, none while nothing changes, and the end of the stream when the server drains."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from inference.v1 import info_pb2

from services.common.load_reports import MIN_INTERVAL_MS, interval_seconds, load_reports
from services.common.sampling import SamplingParams
from services.generator.engine import SchedulerLimits
from services.generator.servicer import InfoServicer, ServedInfo
from tests.unit.fakes import EngineFactory, FakeRunner, FakeTokenizer, drain, eventually, within

LIMITS = SchedulerLimits(max_running_sequences=4, max_total_tokens=1000)


def watch(servicer: InfoServicer, interval_ms: int = 20) -> AsyncIterator[info_pb2.WatchLoadResponse]:
    return servicer.WatchLoad(info_pb2.WatchLoadRequest(min_interval_ms=interval_ms), cast(Any, None))


async def collect(
    stream: AsyncIterator[info_pb2.WatchLoadResponse], into: list[info_pb2.WatchLoadResponse]
) -> None:
    async for report in stream:
        into.append(report)


async def test_reports_at_once_then_on_each_change(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    runner.hold()
    engine = make_engine(runner, LIMITS)
    info = ServedInfo(address="test", engine=engine, message="")
    reports: list[info_pb2.WatchLoadResponse] = []
    task = asyncio.create_task(collect(watch(InfoServicer(info)), reports))
    try:
        await within(eventually(lambda: len(reports) == 1))
        idle = info_pb2.WatchLoadResponse(
            running=0, waiting=0, capacity=4, free_kv_tokens=1000, models=["fake-model"]
        )
        assert reports[0] == idle
        prompt = FakeTokenizer().encode("hello")
        request = engine.submit(prompt, SamplingParams(max_new_tokens=3))
        # The request joins the batch; its reserved tokens (prompt plus max_new_tokens) leave the budget.
        await within(eventually(lambda: any(r.running == 1 for r in reports)))
        busy = next(r for r in reports if r.running == 1)
        assert busy.capacity == 4 and busy.free_kv_tokens == 1000 - (len(prompt) + 3)
        seen = len(reports)
        await asyncio.sleep(0.2)  # nothing changes while the step is held: nothing is sent
        assert len(reports) == seen
        runner.free()
        await drain(request)
        await within(eventually(lambda: reports[-1] == idle))
    finally:
        runner.free()
        task.cancel()


async def test_waiting_requests_are_reported(make_engine: EngineFactory) -> None:
    engine = make_engine(FakeRunner(), LIMITS, start=False)  # nothing is taken from the queue
    info = ServedInfo(address="test", engine=engine, message="")
    stream = watch(InfoServicer(info))
    assert (await within(anext(stream))).waiting == 0
    engine.submit(FakeTokenizer().encode("hello"), SamplingParams(max_new_tokens=3))
    engine.submit(FakeTokenizer().encode("world"), SamplingParams(max_new_tokens=3))
    report = await within(anext(stream))
    while report.waiting < 2:
        report = await within(anext(stream))
    assert (report.running, report.waiting) == (0, 2)
    await stream.aclose()  # type: ignore[attr-defined]


async def test_the_stream_ends_when_the_generator_drains(make_engine: EngineFactory) -> None:
    engine = make_engine(FakeRunner(), LIMITS)
    info = ServedInfo(address="test", engine=engine, message="")
    reports: list[info_pb2.WatchLoadResponse] = []
    task = asyncio.create_task(collect(watch(InfoServicer(info)), reports))
    await within(eventually(lambda: len(reports) == 1))
    info.message = "shutting down"
    await within(task)  # ended by itself, without an error


async def test_a_loading_generator_reports_no_room_and_keeps_the_stream(make_engine: EngineFactory) -> None:
    info = ServedInfo(address="test")  # the model is still loading
    reports: list[info_pb2.WatchLoadResponse] = []
    task = asyncio.create_task(collect(watch(InfoServicer(info)), reports))
    try:
        await within(eventually(lambda: len(reports) == 1))
        assert reports[0] == info_pb2.WatchLoadResponse()
        info.engine = make_engine(FakeRunner(), LIMITS)
        info.message = ""
        await within(eventually(lambda: len(reports) == 2))
        assert reports[1].capacity == 4 and list(reports[1].models) == ["fake-model"]
    finally:
        task.cancel()


def test_the_interval_has_a_default_and_a_floor() -> None:
    assert interval_seconds(info_pb2.WatchLoadRequest()) == 0.1
    assert interval_seconds(info_pb2.WatchLoadRequest(min_interval_ms=1)) == MIN_INTERVAL_MS / 1000
    assert interval_seconds(info_pb2.WatchLoadRequest(min_interval_ms=500)) == 0.5


async def test_reports_come_no_more_often_than_the_interval() -> None:
    figures = iter(range(1000))
    started = time.monotonic()
    stream = load_reports(
        info_pb2.WatchLoadRequest(min_interval_ms=50),
        lambda: info_pb2.WatchLoadResponse(running=next(figures)),  # a new figure at every look
        lambda: False,
    )
    reports = [await within(anext(stream)) for _ in range(5)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert [r.running for r in reports] == [0, 1, 2, 3, 4]
    assert time.monotonic() - started >= 4 * 0.05
