"""Regressions of the gateway's pools and routing review: one discovery shared by concurrent callers,
model-less embeds spread over every embedder, listings kept while a replica loads (UNAVAILABLE, not
NOT_FOUND, for a name a silent replica may serve), the gateway's own WatchLoad, fan-out deadlines and
addresses, one address family per resolved host, retired channels closed, streams closed promptly."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
import pytest
from inference.v1 import embedding_pb2, generation_pb2, info_pb2

from services.common.interceptors import Context
from services.gateway import auth, backends, routing, server
from services.gateway.backends import FAN_OUT_TIMEOUT_S, SERVING, UNREACHABLE
from services.gateway.errors import GatewayError
from services.gateway.metrics import GatewayStats
from services.gateway.servicers import GenerationServicer, InfoServicer
from services.gateway.validation import RequestLimits
from tests.unit.fakes import eventually, within
from tests.unit.test_gateway_pools import CONTEXT, Stack, replica_of

RoutableT = TypeVar("RoutableT", bound=routing.Routable)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    made = Stack()
    yield made
    await made.close()


async def settled(stack: Stack) -> None:
    """The discovery loop's first refresh is over (it runs once at start, then every 10 s)."""
    await eventually(lambda: all(fake.listed >= 1 for fake in stack.replicas.values()))
    async with stack.generator._listing:
        pass


async def test_concurrent_callers_share_one_refresh_when_no_replica_has_answered(stack: Stack) -> None:
    await settled(stack)
    for fake in stack.replicas.values():
        fake.list_delay = 0.3
    stack.generator._listed_at = -1e9  # the retry pause is over
    before = {address: fake.listed for address, fake in stack.replicas.items()}
    started = time.monotonic()
    await within(asyncio.gather(*(stack.generator.served_models() for _ in range(6))))
    # One refresh for the six callers (each would have asked every replica in turn: 6 x 0.3 s).
    assert {address: fake.listed - before[address] for address, fake in stack.replicas.items()} == {
        "g1:1": 1,
        "g2:2": 1,
        "e1:1": 0,
        "e2:2": 0,
    }
    assert time.monotonic() - started < 1.5


async def test_a_model_less_embed_goes_to_every_embedder_whatever_their_listing_order(stack: Stack) -> None:
    # An embedder lists its cache most recently used last: the first listed model is no default.
    stack.serve(e1_1=["m2", "m1"], e2_2=["m1"])
    await stack.embedder.refresh_models()
    for _ in range(4):
        await within(stack.backends.embed(embedding_pb2.EmbedRequest(), CONTEXT))
    assert stack.replicas["e1:1"].count("Embed") == 2 and stack.replicas["e2:2"].count("Embed") == 2
    # A named model still goes to the replicas that list it.
    stack.serve(e1_1=["m1"], e2_2=["m2"])
    await stack.embedder.refresh_models()
    await within(stack.backends.embed(embedding_pb2.EmbedRequest(model="m2"), CONTEXT))
    assert stack.replicas["e2:2"].count("Embed") == 3


async def test_a_replica_that_lists_nothing_while_loading_keeps_its_models(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-b"])
    await stack.generator.refresh_models()
    replica = replica_of(stack.generator, "g2:2")
    replica.set_health(UNREACHABLE)
    stack.serve(g2_2=[])  # restarting: the model is loading
    await stack.generator.refresh_models()
    assert await within(stack.catalog.resolve("generation", "model-b")) == "model-b"
    assert set(await stack.generate_on("model-b", 2)) == {"g2:2"}
    # Serving again, with another model: the new listing counts.
    replica.set_health(SERVING)
    stack.serve(g2_2=["model-c"])
    await stack.generator.refresh_models()
    assert "model-b" not in stack.generator.model_pools
    assert await within(stack.catalog.resolve("generation", "model-c")) == "model-c"


async def test_an_unknown_model_is_unavailable_while_a_replica_has_not_listed_yet(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"])  # g2 does not answer yet
    await stack.generator.refresh_models()
    with pytest.raises(GatewayError) as refused:
        await within(stack.catalog.resolve("generation", "model-b"))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert any("BACKEND_UNAVAILABLE" in str(detail) for detail in refused.value.details)
    assert any("retry_delay" in str(detail) for detail in refused.value.details)
    assert await within(stack.catalog.resolve("generation", "model-a")) == "model-a"
    # Once every replica listed, the name is unknown: NOT_FOUND.
    stack.serve(g2_2=["model-c"])
    await stack.generator.refresh_models()
    with pytest.raises(GatewayError) as refused:
        await within(stack.catalog.resolve("generation", "model-b"))
    assert refused.value.code == grpc.StatusCode.NOT_FOUND


class NoDeadline:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None


async def test_a_fan_out_without_a_client_deadline_caps_each_replica_call(stack: Stack) -> None:
    context = cast(Context, NoDeadline())
    await within(stack.backends.cache_status(embedding_pb2.GetCacheStatusRequest(), context))
    assert [fake.timeouts for fake in (stack.replicas["e1:1"], stack.replicas["e2:2"])] == [
        [FAN_OUT_TIMEOUT_S],
        [FAN_OUT_TIMEOUT_S],
    ]
    await within(stack.backends.cache_status(embedding_pb2.GetCacheStatusRequest(), CONTEXT))
    assert stack.replicas["e1:1"].timeouts[-1] == 30.0  # the client's own deadline
    # A replica past the cap is listed with its error.
    stack.replicas["e2:2"].fail_with = grpc.StatusCode.DEADLINE_EXCEEDED
    reply = await within(stack.backends.cache_status(embedding_pb2.GetCacheStatusRequest(), context))
    assert reply.replicas[1].error.startswith("DEADLINE_EXCEEDED")


async def test_preload_and_clear_name_every_replica_asked_and_log_the_failed(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    for fake in stack.replicas.values():
        fake.replies["PreloadModels"] = embedding_pb2.PreloadModelsResponse(accepted=["m1"])
    stack.replicas["e2:2"].fail_with = grpc.StatusCode.UNAVAILABLE
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        reply = await within(
            stack.backends.preload(embedding_pb2.PreloadModelsRequest(models=["m1"]), CONTEXT)
        )
        cleared = await within(stack.backends.clear_cache(embedding_pb2.ClearCacheRequest(), CONTEXT))
    assert (list(reply.accepted), list(reply.addresses)) == (["m1"], ["e1:1", "e2:2"])
    assert list(cleared.addresses) == ["e1:1", "e2:2"]
    failures = [record.getMessage() for record in caplog.records if "e2:2" in record.getMessage()]
    assert len(failures) == 2 and all("UNAVAILABLE" in text for text in failures)
    # All failed: the client gets the error.
    stack.replicas["e1:1"].fail_with = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await within(stack.backends.preload(embedding_pb2.PreloadModelsRequest(models=["m1"]), CONTEXT))


def _answer(ip: str) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (ip, 50052))


def test_a_resolved_host_is_one_family_sorted() -> None:
    both = [_answer("::1"), _answer("10.0.0.9"), _answer("10.0.0.10"), _answer("10.0.0.9")]
    assert backends._one_family(both) == ["10.0.0.9", "10.0.0.10"]
    assert backends._one_family(list(reversed(both))) == ["10.0.0.9", "10.0.0.10"]
    assert backends._one_family([_answer("fe80::2"), _answer("::1")]) == ["::1", "fe80::2"]


async def test_a_retired_replica_channel_is_closed_when_the_backend_closes() -> None:
    stack = Stack("g1:1,g2:2", "e1:1")
    replica = replica_of(stack.generator, "g2:2")
    stack.generator._retire(replica)
    assert replica.channel in stack.generator._old_channels
    await within(stack.close())
    # The graceful close was cut short by `close`, which closed the channel at once.
    assert stack.replicas["g2:2"].closes[-1] is None


async def test_a_stream_that_cannot_start_leaves_no_outstanding_count(stack: Stack) -> None:
    fake = stack.replicas["g1:1"]
    replica = replica_of(stack.generator, "g1:1")
    stack.serve(g1_1=["model-a"], g2_2=["model-b"])
    await stack.generator.refresh_models()

    def broken(method: str, response_deserializer: Callable[[bytes], Any], **_: Any) -> Any:
        def make(request: Any, **__: Any) -> Any:
            raise ValueError("the channel is closed")

        return make

    fake.unary_stream = broken  # type: ignore[method-assign]
    replica._stubs = {}
    with pytest.raises(ValueError):
        await within(
            anext(
                stack.backends.generate_stream(generation_pb2.GenerateStreamRequest(model="model-a"), CONTEXT)
            )
        )
    assert replica.outstanding == 0


async def test_a_stream_the_client_leaves_frees_its_replica_at_once(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-a"])
    await stack.generator.refresh_models()
    servicer = GenerationServicer(stack.backends, stack.catalog, RequestLimits())
    stream = servicer.GenerateStream(
        generation_pb2.GenerateStreamRequest(model="model-a", prompt="hi"), CONTEXT
    )
    await within(anext(stream))
    assert sum(replica.outstanding for replica in stack.generator.pool.replicas) == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert sum(replica.outstanding for replica in stack.generator.pool.replicas) == 0


async def test_the_gateway_load_report_changes_only_and_ends_on_drain(stack: Stack) -> None:
    stats = GatewayStats()
    draining = False
    info = InfoServicer(stack.backends, stack.catalog, stats, "gw:1", lambda: draining)
    reports: list[info_pb2.WatchLoadResponse] = []
    stats.running = 1  # the watch itself, as the request metrics count it

    async def read() -> None:
        async for report in info.WatchLoad(info_pb2.WatchLoadRequest(min_interval_ms=1), CONTEXT):
            reports.append(report)

    reader = asyncio.create_task(read())
    await eventually(lambda: len(reports) == 1)
    await asyncio.sleep(0.2)  # ten samples at the 20 ms floor, nothing changed
    assert [report.running for report in reports] == [0]
    stats.running = 3
    await eventually(lambda: len(reports) == 2)
    assert reports[-1].running == 2
    reply = await within(info.GetStats(info_pb2.GetStatsRequest(), CONTEXT))
    assert reply.components[0].requests_running == 2
    draining = True
    await within(reader)
    assert len(reports) == 2


async def test_the_gateway_watch_load_needs_admin_and_no_drain_waits_for_it() -> None:
    assert auth.METHOD_SCOPES["/inference.v1.InfoService/WatchLoad"] == "admin"
    draining = server.Draining()

    async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
        yield info_pb2.WatchLoadResponse()
        await asyncio.Event().wait()

    stream = draining.stream(server.WATCH_LOAD, behavior)(None, CONTEXT)
    await within(anext(stream))
    draining.start()
    assert await within(draining.wait_idle(0.5))
    await stream.aclose()  # type: ignore[attr-defined]


class Holders:
    """A policy that picks the first candidate and records each replica `served` is told of."""

    def __init__(self, served: list[str]) -> None:
        self.recorded = served

    def choose(self, candidates: Sequence[RoutableT], prefix: Sequence[int]) -> RoutableT:
        return candidates[0]

    def served(self, replica: routing.Routable, prefix: Sequence[int]) -> None:
        self.recorded.append(replica.address)


async def test_a_prefix_holder_is_recorded_only_once_the_replica_answered() -> None:
    served: list[str] = []
    stack = Stack("g1:1,g2:2", "e1:1", policy=lambda: Holders(served))
    try:
        stack.serve(g1_1=["model-a"], g2_2=["model-a"])
        await stack.generator.refresh_models()
        stack.replicas["g1:1"].fail_with = grpc.StatusCode.UNAVAILABLE
        request = generation_pb2.GenerateRequest(model="model-a", prompt="hello")
        await within(stack.backends.generate(request, CONTEXT))
        assert served == ["g2:2"]
        stream = generation_pb2.GenerateStreamRequest(model="model-a", prompt="hello")
        assert len([message async for message in stack.backends.generate_stream(stream, CONTEXT)]) == 3
        assert served == ["g2:2", "g2:2"]
    finally:
        await stack.close()
