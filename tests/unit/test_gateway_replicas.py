"""The gateway's replica handling without a process: round-robin over the replicas that serve
(health watch and channel state), retries of UNAVAILABLE on another replica, streams retried only
before their first message, and the reconnect backoff of the channels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2
from inference.v1 import embedding_pb2, generation_pb2

from services.common.interceptors import Context
from services.gateway.backends import (
    MAX_RECONNECT_BACKOFF_MS,
    SERVING,
    UNCHECKED,
    UNREACHABLE,
    Backend,
    Backends,
    ResponseCache,
    channel_options,
    replica_channel_options,
)
from services.gateway.errors import GatewayError, retry_delay
from tests.unit.fakes import eventually, within

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "Connection refused"
    )


class FakeChannel:
    """A channel to one fake replica: every call answers an empty reply (or `fail_with`), streams
    send `stream_length` messages (failing after `fail_after` of them when set), and the health
    Watch reports what the test puts in `health`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.state = grpc.ChannelConnectivity.READY
        self.fail_with: grpc.StatusCode | None = None
        self.stream_length = 3
        self.fail_after: int | None = None
        self.calls: list[str] = []
        self.cancelled = 0
        self.health: asyncio.Queue[int | Exception] = asyncio.Queue()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.state

    def _error(self) -> grpc.aio.AioRpcError:
        assert self.fail_with is not None
        return grpc.aio.AioRpcError(self.fail_with, grpc.aio.Metadata(), grpc.aio.Metadata(), "fake")

    def unary_unary(self, method: str, response_deserializer: Callable[[bytes], Any], **_: Any) -> Any:
        async def call(request: Any, **__: Any) -> Any:
            self.calls.append(method)
            if self.fail_with is not None:
                raise self._error()
            return response_deserializer(b"")

        return call

    def unary_stream(self, method: str, response_deserializer: Callable[[bytes], Any], **_: Any) -> Any:
        channel = self

        class Call:
            def __init__(self) -> None:
                channel.calls.append(method)

            def cancel(self) -> bool:
                channel.cancelled += 1
                return True

            async def _messages(self) -> AsyncIterator[Any]:
                if method == HEALTH_WATCH:
                    while True:
                        item = await channel.health.get()
                        if isinstance(item, Exception):
                            raise item
                        yield health_pb2.HealthCheckResponse(status=item)
                if channel.fail_with is not None and channel.fail_after is None:
                    raise channel._error()
                for number in range(channel.stream_length):
                    if channel.fail_after is not None and number == channel.fail_after:
                        raise channel._error()
                    message = response_deserializer(b"")
                    message.index = number
                    yield message

            def __aiter__(self) -> AsyncIterator[Any]:
                return self._messages()

        return lambda request, **__: Call()

    async def close(self) -> None:
        pass


class FakeContext:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "r1"),)

    def time_remaining(self) -> float | None:
        return 30.0


CONTEXT = cast(Context, FakeContext())


class Stack:
    def __init__(
        self, generators: str = "g1:1,g2:2", embedders: str = "e1:1,e2:2", attempts: int = 3
    ) -> None:
        self.channels: dict[str, FakeChannel] = {}
        self.generator = Backend("generator", generators, attempts, [], False, channel_factory=self._channel)
        self.embedder = Backend("embedder", embedders, attempts, [], False, channel_factory=self._channel)
        self.backends = Backends(self.generator, self.embedder, ResponseCache(0))

    def _channel(self, target: str, options: list[tuple[str, Any]], interceptors: list[Any]) -> Any:
        self.channels[target] = FakeChannel(target)
        return self.channels[target]

    def calls(self, address: str, method: str) -> int:
        return sum(1 for call in self.channels[address].calls if call.endswith("/" + method))

    async def health(self, backend: Backend, address: str, status: int | Exception, wanted: str = "") -> None:
        self.channels[address].health.put_nowait(status)
        replica = next(replica for replica in backend.pool.replicas if replica.address == address)
        if not wanted:
            named = health_pb2.HealthCheckResponse.ServingStatus.Name
            wanted = UNREACHABLE if isinstance(status, Exception) else named(status)
        await eventually(lambda: replica.health == wanted)

    async def embed_on(self, count: int) -> list[str]:
        """The replica each of `count` Embed calls ended on."""
        served = []
        for _ in range(count):
            before = {address: self.calls(address, "Embed") for address in ("e1:1", "e2:2")}
            await within(self.backends.embed(embedding_pb2.EmbedRequest(), CONTEXT))
            served.append(
                next(
                    a for a in before if self.calls(a, "Embed") > before[a] and not self.channels[a].fail_with
                )
            )
        return served

    async def close(self) -> None:
        await self.backends.close()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    made = Stack()
    yield made
    await made.close()


def test_every_channel_reconnects_within_a_second() -> None:
    for options in (dict(replica_channel_options()), dict(channel_options(3))):
        assert options["grpc.max_reconnect_backoff_ms"] == MAX_RECONNECT_BACKOFF_MS <= 1000
        assert options["grpc.initial_reconnect_backoff_ms"] <= MAX_RECONNECT_BACKOFF_MS
        assert options["grpc.min_reconnect_backoff_ms"] <= 5000


async def test_calls_alternate_between_the_replicas(stack: Stack) -> None:
    assert await stack.embed_on(4) == ["e1:1", "e2:2", "e1:1", "e2:2"]


async def test_a_replica_reporting_not_serving_is_skipped_until_it_serves_again(stack: Stack) -> None:
    await stack.health(stack.embedder, "e1:1", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await stack.embed_on(3) == ["e2:2"] * 3
    await stack.health(stack.embedder, "e1:1", health_pb2.HealthCheckResponse.SERVING)
    assert sorted(await stack.embed_on(2)) == ["e1:1", "e2:2"]


async def test_a_replica_whose_watch_broke_off_is_skipped_until_it_serves_again(stack: Stack) -> None:
    await stack.health(stack.embedder, "e2:2", health_pb2.HealthCheckResponse.SERVING)
    await stack.health(stack.embedder, "e2:2", unavailable())
    assert await stack.embed_on(3) == ["e1:1"] * 3
    # The watch starts again by itself and the replica's SERVING takes it back.
    await stack.health(stack.embedder, "e2:2", health_pb2.HealthCheckResponse.SERVING)
    assert sorted(await stack.embed_on(2)) == ["e1:1", "e2:2"]


async def test_a_replica_whose_channel_fails_to_connect_is_skipped(stack: Stack) -> None:
    stack.channels["e1:1"].state = grpc.ChannelConnectivity.TRANSIENT_FAILURE
    assert await stack.embed_on(3) == ["e2:2"] * 3
    stack.channels["e1:1"].state = grpc.ChannelConnectivity.READY
    assert sorted(await stack.embed_on(2)) == ["e1:1", "e2:2"]


async def test_an_unavailable_unary_call_is_retried_on_the_other_replica(stack: Stack) -> None:
    stack.channels["e1:1"].fail_with = grpc.StatusCode.UNAVAILABLE
    assert await stack.embed_on(4) == ["e2:2"] * 4
    # The failed replica was tried once, then left out for its cool-down.
    assert stack.calls("e1:1", "Embed") == 1


async def test_other_failures_are_not_retried(stack: Stack) -> None:
    stack.channels["e1:1"].fail_with = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await within(stack.backends.embed(embedding_pb2.EmbedRequest(), CONTEXT))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (stack.calls("e1:1", "Embed"), stack.calls("e2:2", "Embed")) == (1, 0)


async def test_a_single_replica_is_retried_after_a_pause_up_to_the_attempts() -> None:
    single = Stack("g:1", "e:1", attempts=3)
    try:
        single.channels["e:1"].fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await within(single.backends.embed(embedding_pb2.EmbedRequest(), CONTEXT))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert single.calls("e:1", "Embed") == 3
    finally:
        await single.close()


async def collect(messages: AsyncIterator[generation_pb2.GenerateStreamResponse]) -> list[int]:
    return [message.index async for message in messages]


async def test_a_stream_refused_before_its_first_message_starts_on_the_other_replica(stack: Stack) -> None:
    stack.channels["g1:1"].fail_with = grpc.StatusCode.UNAVAILABLE
    for _ in range(2):
        stream = stack.backends.generate_stream(generation_pb2.GenerateStreamRequest(), CONTEXT)
        assert await within(collect(stream)) == [0, 1, 2]
    assert stack.calls("g1:1", "GenerateStream") == 1
    assert stack.calls("g2:2", "GenerateStream") == 2


async def test_a_stream_cut_after_its_first_message_ends_with_the_error_and_is_not_replayed(
    stack: Stack,
) -> None:
    for channel in stack.channels.values():
        channel.fail_with, channel.fail_after = grpc.StatusCode.UNAVAILABLE, 2
    received: list[int] = []
    with pytest.raises(GatewayError) as raised:
        async for message in stack.backends.chat_stream(generation_pb2.ChatRequest(), CONTEXT):
            received.append(message.index)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "generator replica" in raised.value.message and "send the request again" in raised.value.message
    assert retry_delay(raised.value) == 1.0
    assert received == [0, 1]
    assert stack.calls("g1:1", "ChatStream") + stack.calls("g2:2", "ChatStream") == 1
    assert sum(channel.cancelled for channel in stack.channels.values()) >= 1


async def test_a_dns_target_is_one_channel_that_grpc_balances_and_retries() -> None:
    named = Stack("dns:///generator:50052", "dns:///embedder:50053")
    try:
        (replica,) = named.generator.pool.replicas
        assert replica.address == "dns:///generator:50052" and not replica.watched
        assert named.generator.attempts == 1 and named.generator.stream_attempts == 3
        await within(named.backends.embed(embedding_pb2.EmbedRequest(), CONTEXT))
        assert named.calls("dns:///embedder:50053", "Embed") == 1
        # Nothing watches a name target's health: gRPC's own health checks cover its addresses.
        assert all(call != HEALTH_WATCH for call in named.channels["dns:///generator:50052"].calls)
    finally:
        await named.close()


def test_replica_health_names() -> None:
    assert (
        health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING) == SERVING
    )


async def test_a_watch_that_fails_unexpectedly_marks_the_replica_down_and_starts_again(stack: Stack) -> None:
    await stack.health(stack.embedder, "e2:2", health_pb2.HealthCheckResponse.SERVING)
    await stack.health(stack.embedder, "e2:2", RuntimeError("a bug in the watch"))
    assert await stack.embed_on(3) == ["e1:1"] * 3
    await stack.health(stack.embedder, "e2:2", health_pb2.HealthCheckResponse.SERVING)
    assert sorted(await stack.embed_on(2)) == ["e1:1", "e2:2"]


async def test_a_replica_without_a_health_service_is_asked_again_later(stack: Stack) -> None:
    unimplemented = grpc.aio.AioRpcError(
        grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no health"
    )
    await stack.health(stack.embedder, "e1:1", unimplemented, wanted=UNCHECKED)
    # Replaced by a replica that has one: its status counts again.
    await stack.health(stack.embedder, "e1:1", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await stack.embed_on(2) == ["e2:2"] * 2


async def test_a_watch_task_that_ended_is_started_again(stack: Stack) -> None:
    await stack.embed_on(1)
    ended = stack.embedder._watches[0]
    ended.cancel()
    await asyncio.gather(ended, return_exceptions=True)
    await stack.embed_on(1)
    assert stack.embedder._watches[0] is not ended and not stack.embedder._watches[0].done()
    await stack.health(stack.embedder, "e1:1", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await stack.embed_on(2) == ["e2:2"] * 2
