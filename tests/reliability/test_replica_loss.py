"""Replica loss and rejoin: under steady load through Envoy (REST token streams, a native gRPC
stream, unary generations, embeddings), `kill -9` one of two generators and one of two embedders.
No request started after the kill fails; a stream that was on the dead replica ends with an in-band
UNAVAILABLE (an SSE `error` event, or the gRPC status), never a hang or a clean-looking truncated
end; restarted on the same ports, each replica gets traffic again within 5 s of reporting SERVING."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, generation_pb2_grpc

from services.common.interceptors import Context
from services.gateway.backends import Backend, Backends, ResponseCache
from tests.fixtures_gateway import EnvoyService, descriptor_for_envoy, start_envoy, start_gateway
from tests.reliability.figures import report
from tests.reliability.replicas_stack import ModelReplica
from tests.stack import ServiceProcess, free_port

REST_STREAM_CLIENTS = 4
GRPC_STREAM_CLIENTS = 1
GENERATE_CLIENTS = 1
EMBED_CLIENTS = 2
MAX_NEW_TOKENS = 32
# A request that takes longer than this counts as hung (a stream here takes a few seconds).
REQUEST_TIMEOUT_S = 60.0
REJOIN_LIMIT_S = 5.0
# The in-process replica is down this long, then back (and SERVING) at once.
OUTAGE_S = 20.0
FAST_REJOIN_LIMIT_S = 2.0
UNAVAILABLE = 14
# The gateway's message for a stream whose replica went away tells the client what to do.
RESEND_HINT = "send the request again"


@dataclass
class ReplicaStack:
    generators: list[ModelReplica]
    embedders: list[ModelReplica]
    gateway: ServiceProcess
    envoy: EnvoyService

    @property
    def envoy_grpc_target(self) -> str:
        return self.envoy.url.removeprefix("http://")


@pytest.fixture(scope="module")
def replica_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaStack]:
    generators = [ModelReplica("generator"), ModelReplica("generator")]
    embedders = [ModelReplica("embedder"), ModelReplica("embedder")]
    replicas = [*generators, *embedders]
    gateway: ServiceProcess | None = None
    envoy: EnvoyService | None = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_until_serving()
        gateway, address, _ = start_gateway(
            ",".join(replica.address for replica in generators),
            ",".join(replica.address for replica in embedders),
            ("--cache-size", "0", "--tracing", "false", "--metrics-port", "0"),
            name="gateway-replica-loss",
        )
        envoy = start_envoy(
            address,
            tmp_path_factory.mktemp("envoy-replica-loss"),
            "envoy-replica-loss",
            descriptor_for_envoy(),
        )
        yield ReplicaStack(generators, embedders, gateway, envoy)
    finally:
        if envoy is not None:
            envoy.process.stop()
        if gateway is not None:
            gateway.stop()
        for replica in replicas:
            replica.stop()


@dataclass
class Outcome:
    kind: str
    started: float
    # ok | cut-unavailable | cut-other: ... | failed: ... | truncated | hung
    result: str


class Load:
    """Clients that each send one request after another until `stop` is set."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.outcomes: list[Outcome] = []
        # Streams that received a token and have not ended yet.
        self.streaming = 0

    async def run(self, one: Callable[[int], Awaitable[Outcome]]) -> None:
        number = 0
        while not self.stop.is_set():
            self.outcomes.append(await one(number))
            number += 1

    async def rest_stream(self, client: httpx2.AsyncClient, number: int) -> Outcome:
        started = time.monotonic()
        body = {
            "prompt": f"Story {number}: once upon a time",
            "stream": True,
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": True, "temperature": 0.9},
        }
        events = 0
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with client.stream("POST", "/generate", json=body) as reply:
                    if reply.status_code != 200:
                        text = (await reply.aread())[:200].decode(errors="replace")
                        return Outcome("rest-stream", started, f"failed: HTTP {reply.status_code} {text}")
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            return Outcome("rest-stream", started, "ok")
                        event = json.loads(line.removeprefix("data: "))
                        if event.get("error"):
                            error = event["error"]
                            lost = error.get("code") == UNAVAILABLE and RESEND_HINT in error.get(
                                "message", ""
                            )
                            cut = "cut-unavailable" if lost and events else f"cut-other: {event}"
                            return Outcome("rest-stream", started, cut)
                        events += 1
                        if events == 1:
                            self.streaming += 1
                    return Outcome("rest-stream", started, "truncated")
        except TimeoutError:
            return Outcome("rest-stream", started, "hung")
        except httpx2.HTTPError as error:
            return Outcome("rest-stream", started, f"failed: {type(error).__name__} {error}")
        finally:
            if events:
                self.streaming -= 1

    async def grpc_stream(self, stub: generation_pb2_grpc.GenerationServiceAsyncStub, number: int) -> Outcome:
        started = time.monotonic()
        request = generation_pb2.GenerateStreamRequest(
            prompt=f"Tale {number}: long ago",
            parameters=common_pb2.SamplingParameters(max_new_tokens=MAX_NEW_TOKENS, do_sample=True),
        )
        messages = 0
        try:
            async for _ in stub.GenerateStream(request, timeout=REQUEST_TIMEOUT_S):
                messages += 1
                if messages == 1:
                    self.streaming += 1
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Outcome("grpc-stream", started, "hung")
            if (
                messages
                and error.code() == grpc.StatusCode.UNAVAILABLE
                and RESEND_HINT in (error.details() or "")
            ):
                return Outcome("grpc-stream", started, "cut-unavailable")
            prefix = "cut-other" if messages else "failed"
            return Outcome("grpc-stream", started, f"{prefix}: {error.code().name} {error.details()}")
        finally:
            if messages:
                self.streaming -= 1
        return Outcome("grpc-stream", started, "ok")

    async def generate(self, client: httpx2.AsyncClient, number: int) -> Outcome:
        started = time.monotonic()
        body = {"prompt": f"Question {number}:", "parameters": {"max_new_tokens": 2}}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                reply = await client.post("/generate", json=body)
        except TimeoutError:
            return Outcome("generate", started, "hung")
        except httpx2.HTTPError as error:
            return Outcome("generate", started, f"failed: {type(error).__name__} {error}")
        if reply.status_code != 200:
            return Outcome("generate", started, f"failed: HTTP {reply.status_code} {reply.text[:200]}")
        return Outcome("generate", started, "ok")

    async def embed(self, client: httpx2.AsyncClient, number: int) -> Outcome:
        started = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                reply = await client.post("/embeddings", json={"input": f"sentence number {number}"})
        except TimeoutError:
            return Outcome("embed", started, "hung")
        except httpx2.HTTPError as error:
            return Outcome("embed", started, f"failed: {type(error).__name__} {error}")
        if reply.status_code != 200:
            return Outcome("embed", started, f"failed: HTTP {reply.status_code} {reply.text[:200]}")
        return Outcome("embed", started, "ok")


def rejoin_seconds(replica: ModelReplica) -> float:
    """Seconds from the restarted replica's health saying SERVING to its metrics showing work."""
    serving = replica.wait_until_serving()
    before = replica.served()
    deadline = serving + 30.0
    while time.monotonic() < deadline:
        if replica.served() > before:
            return time.monotonic() - serving
        time.sleep(0.05)
    return float("inf")


async def wait_for(condition: Callable[[], bool], limit_s: float) -> None:
    """Until `condition()` (run in a thread: it reads metrics) holds, or `limit_s` passed."""
    for _ in range(int(limit_s / 0.1)):
        if await asyncio.to_thread(condition):
            return
        await asyncio.sleep(0.1)


async def test_losing_a_replica_fails_no_new_request_and_it_rejoins(replica_stack: ReplicaStack) -> None:
    load = Load()
    generator, embedder = replica_stack.generators[0], replica_stack.embedders[0]
    async with (
        httpx2.AsyncClient(base_url=replica_stack.envoy.url, timeout=REQUEST_TIMEOUT_S) as client,
        grpc.aio.insecure_channel(replica_stack.envoy_grpc_target) as channel,
    ):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        clients = [
            *(
                asyncio.create_task(load.run(lambda n: load.rest_stream(client, n)))
                for _ in range(REST_STREAM_CLIENTS)
            ),
            *(
                asyncio.create_task(load.run(lambda n: load.grpc_stream(stub, n)))
                for _ in range(GRPC_STREAM_CLIENTS)
            ),
            *(
                asyncio.create_task(load.run(lambda n: load.generate(client, n)))
                for _ in range(GENERATE_CLIENTS)
            ),
            *(asyncio.create_task(load.run(lambda n: load.embed(client, n))) for _ in range(EMBED_CLIENTS)),
        ]
        baseline = [replica.served() for replica in replica_stack.generators]
        try:
            # Kill while both generators have had work and streams run on the one to be killed.
            await wait_for(
                lambda: (
                    all(r.served() > b for r, b in zip(replica_stack.generators, baseline, strict=True))
                    and generator.running() >= 2
                    and load.streaming >= 3
                ),
                60.0,
            )
            await asyncio.to_thread(generator.kill)
            await asyncio.to_thread(embedder.kill)
            killed = time.monotonic()
            await asyncio.sleep(3.0)
            generator.start()
            embedder.start()
            rejoined = await asyncio.gather(
                asyncio.to_thread(rejoin_seconds, generator), asyncio.to_thread(rejoin_seconds, embedder)
            )
            await asyncio.sleep(2.0)
        finally:
            load.stop.set()
            await asyncio.gather(*clients)

    after = [outcome for outcome in load.outcomes if outcome.started >= killed]
    failed_after = [outcome for outcome in after if outcome.result != "ok"]
    before = [outcome for outcome in load.outcomes if outcome.started < killed]
    cut = [outcome for outcome in load.outcomes if outcome.result.startswith("cut")]
    cut_unavailable = [outcome for outcome in cut if outcome.result == "cut-unavailable"]
    report(
        "replica_loss",
        started_after_kill=len(after),
        failed_after_kill=len(failed_after),
        streams_cut=len(cut),
        cut_with_unavailable_event=len(cut_unavailable),
        rejoin_seconds_generator=rejoined[0],
        rejoin_seconds_embedder=rejoined[1],
    )
    assert len(after) >= 10, load.outcomes
    assert not failed_after, failed_after
    # Before the kill a stream either completed or, cut off on the dead replica, said UNAVAILABLE.
    assert all(outcome.result in ("ok", "cut-unavailable") for outcome in before), before
    assert cut and cut == cut_unavailable, cut
    assert max(rejoined) <= REJOIN_LIMIT_S, rejoined


class CountingEmbedder:
    """A replica that starts in milliseconds: it counts the Embed calls it answered."""

    def __init__(self) -> None:
        self.calls = 0

    async def embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> embedding_pb2.EmbedResponse:
        self.calls += 1
        return embedding_pb2.EmbedResponse(model="fast")


async def fast_replica(port: int, servicer: CountingEmbedder) -> grpc.aio.Server:
    server = grpc.aio.server()
    embed = grpc.unary_unary_rpc_method_handler(
        servicer.embed,
        request_deserializer=embedding_pb2.EmbedRequest.FromString,
        response_serializer=embedding_pb2.EmbedResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.v1.EmbeddingService", {"Embed": embed}),)
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


class CallContext:
    """What the gateway reads of its own caller's call: no metadata, 5 s left."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float:
        return 5.0


async def test_a_replica_back_after_a_long_outage_is_used_within_seconds() -> None:
    """The 28 s bug: gRPC's default reconnect backoff grows to tens of seconds while a replica is
    down, so one that comes back quickly waited for the next attempt. The gateway's own Backend
    against two in-process replicas: one goes away for longer than that backoff needs to grow."""
    ports = [free_port(), free_port()]
    servicers = [CountingEmbedder(), CountingEmbedder()]
    servers = [await fast_replica(port, servicer) for port, servicer in zip(ports, servicers, strict=True)]
    embedder = Backend("embedder", ",".join(f"127.0.0.1:{port}" for port in ports), 3, [], False)
    generator = Backend("generator", "127.0.0.1:1", 1, [], False)
    backends = Backends(generator, embedder, ResponseCache(0))
    context = cast(Context, CallContext())
    failures: list[str] = []
    stop = asyncio.Event()

    async def calls() -> None:
        while not stop.is_set():
            try:
                await backends.embed(embedding_pb2.EmbedRequest(), context)
            except grpc.aio.AioRpcError as error:
                failures.append(error.code().name)
            await asyncio.sleep(0.02)

    load = asyncio.create_task(calls())
    try:
        await asyncio.sleep(1.0)
        assert all(servicer.calls for servicer in servicers), [s.calls for s in servicers]
        await servers[0].stop(None)
        # gRPC's defaults would be trying again only every 10-27 s by now.
        await asyncio.sleep(OUTAGE_S)
        servicers[0] = CountingEmbedder()
        servers[0] = await fast_replica(ports[0], servicers[0])
        serving = time.monotonic()
        for _ in range(int(REJOIN_LIMIT_S * 2 / 0.02)):
            if servicers[0].calls:
                break
            await asyncio.sleep(0.02)
        rejoin = time.monotonic() - serving if servicers[0].calls else float("inf")
    finally:
        stop.set()
        await load
        await backends.close()
        for server in servers:
            await server.stop(None)
    report("replica_fast_restart", outage_seconds=OUTAGE_S, rejoin_seconds=rejoin, failed_calls=len(failures))
    assert not failures, failures
    assert rejoin <= FAST_REJOIN_LIMIT_S, rejoin
