"""SIGTERM to each tier under load, one at a time, restarting it after: the work in flight
finishes within the tier's grace, and new work meanwhile is refused at once with 503 and
Retry-After over REST and UNAVAILABLE with a RetryInfo over gRPC, never a hang or a 500. With two
gateways behind one Envoy, a draining one costs clients nothing: Envoy retries its refusals on
the other."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import yaml
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from inference.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2, generation_pb2_grpc

from tests.fixtures_gateway import descriptor_for_envoy, render_envoy, run_envoy
from tests.reliability.figures import report
from tests.reliability.stack import (
    Outcome,
    Stack,
    Tier,
    client_for,
    embed,
    start_stack,
    stream_chat,
    unary_chat,
)
from tests.stack import ServiceProcess, free_port

IN_FLIGHT = 3
# Long enough that the streams are still running when the signal arrives.
LONG_TOKENS = 16
LONG_TEXT = "Count from one to one hundred in words, separated by commas."
PROBE_TIMEOUT = 10.0
PROBE_EVERY = 0.5
# Generous: the machine is shared, and a slow stream must not be cut off by the grace itself.
GRACE_S = 60.0
# The work in flight ends within seconds: a tier that stops much later waited on something else
# (the gateways' endless health Watch streams held the embedder for its whole grace).
STOP_WITHIN_S = 25.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    grace = str(GRACE_S)
    started = start_stack(
        tmp_path_factory.mktemp("drain"),
        generator_args=("--shutdown-grace-seconds", grace),
        embedder_args=("--shutdown-grace-s", grace),
        gateway_args=("--shutdown-grace-s", grace),
    )
    yield started
    started.stop()


async def grpc_probe(stack: Stack, embedding: bool = False) -> tuple[grpc.StatusCode, bool] | None:
    """One Generate (or Embed) straight to the gateway: its status and whether it carried a
    RetryInfo; None when the gateway no longer listens."""
    metadata = (("authorization", f"Bearer {stack.keys['user']}"),)
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        try:
            if embedding:
                text = struct_pb2.Value(string_value="a probe")
                await embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                    embedding_pb2.EmbedRequest(input=text), metadata=metadata, timeout=PROBE_TIMEOUT
                )
            else:
                request = generation_pb2.GenerateRequest(
                    prompt="Hello", parameters=common_pb2.SamplingParameters(max_new_tokens=2)
                )
                await generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                    request, metadata=metadata, timeout=PROBE_TIMEOUT
                )
        except grpc.aio.AioRpcError as error:
            if tier_gone(error):
                # The gateway itself has closed its port: nothing there can add a RetryInfo.
                return None
            return error.code(), _has_retry_info(error)
        return grpc.StatusCode.OK, False


def tier_gone(error: grpc.aio.AioRpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (error.details() or "").lower()


def _has_retry_info(error: grpc.aio.AioRpcError) -> bool:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    return False


async def bounded(call: Awaitable[Outcome]) -> Outcome:
    """`call`, or a status-0 outcome named "hung" when it takes longer than PROBE_TIMEOUT."""
    try:
        return await asyncio.wait_for(call, PROBE_TIMEOUT)
    except TimeoutError:
        return Outcome(0, detail="hung")


async def drain(
    stack: Stack,
    tier: Tier,
    in_flight: Callable[[httpx.AsyncClient, Callable[[], None]], Coroutine[Any, Any, Outcome]],
    probe: Callable[[httpx.AsyncClient], Awaitable[Outcome]],
) -> tuple[list[Outcome], list[Outcome], list[tuple[grpc.StatusCode, bool]], float]:
    """Start IN_FLIGHT calls, SIGTERM `tier` once they run, probe with new calls until it has
    exited (and once more after); the in-flight outcomes, the probes', the gRPC probes' and the
    seconds from the signal to the exit."""
    async with client_for(stack, connections=64) as client:
        running = asyncio.Event()
        seen = 0

        def first_event() -> None:
            nonlocal seen
            seen += 1
            if seen == IN_FLIGHT:
                running.set()

        work = [asyncio.create_task(in_flight(client, first_event)) for _ in range(IN_FLIGHT)]
        await asyncio.wait_for(running.wait(), 120)
        assert tier.process is not None
        signalled = time.monotonic()
        tier.process.send_signal(signal.SIGTERM)
        probes: list[Outcome] = []
        grpc_probes: list[tuple[grpc.StatusCode, bool]] = []
        exited_at: float | None = None
        while exited_at is None or len(probes) < 2:
            await asyncio.sleep(PROBE_EVERY)
            probes.append(await bounded(probe(client)))
            answer = await grpc_probe(stack, embedding=tier is stack.embedder)
            if answer is not None:
                grpc_probes.append(answer)
            if exited_at is None and not tier.process.alive():
                exited_at = time.monotonic()
            assert time.monotonic() - signalled < GRACE_S + 30, f"{tier.name} did not stop"
        done = [await bounded(task) for task in work]
        return done, probes, grpc_probes, exited_at - signalled


async def restart(
    stack: Stack, tier: Tier, probe: Callable[[httpx.AsyncClient], Awaitable[Outcome]]
) -> float:
    """Start `tier` again where it was; seconds from SERVING until a call through Envoy succeeds."""
    await asyncio.to_thread(tier.start)
    serving = time.monotonic()
    async with client_for(stack, connections=4) as client:
        while time.monotonic() - serving < 60:
            outcome = await bounded(probe(client))
            if outcome.status == 200:
                return time.monotonic() - serving
            await asyncio.sleep(0.2)
    raise AssertionError(f"nothing succeeded through Envoy 60 s after {tier.name} was SERVING again")


def check_and_report(
    tier: str,
    done: list[Outcome],
    probes: list[Outcome],
    grpc_probes: list[tuple[grpc.StatusCode, bool]],
    seconds: float,
    recovered: float,
) -> None:
    refused = [o for o in probes if o.status == 503]
    report(
        "drain",
        tier=tier,
        in_flight_completed=sum(o.status == 200 and o.complete for o in done),
        refused_503=len(refused),
        grpc_unavailable=sum(code == grpc.StatusCode.UNAVAILABLE for code, _ in grpc_probes),
        hung=sum(o.detail == "hung" for o in probes + done),
        seconds=seconds,
        recovered_after_s=recovered,
    )
    unfinished = [(o.status, o.detail) for o in done if not (o.status == 200 and o.complete)]
    assert not unfinished, f"{tier}: work in flight did not finish: {unfinished[:3]}"
    bad = [(o.status, o.detail) for o in probes if o.status not in (200, 503)]
    assert not bad, f"{tier}: new work during the drain got {bad[:3]}"
    unclean = [o.detail for o in refused if not o.refusal_ok]
    assert not unclean, f"{tier}: 503s without Retry-After or a JSON error: {unclean[:3]}"
    assert refused, f"{tier}: no new call was refused while it drained: {[o.status for o in probes]}"
    raw = [o.detail for o in refused if "failed to connect" in o.detail]
    assert not raw, f"{tier}: grpc's transport error reached the client: {raw[:1]}"
    wrong = [
        (code, retry)
        for code, retry in grpc_probes
        if code != grpc.StatusCode.OK and not (code == grpc.StatusCode.UNAVAILABLE and retry)
    ]
    assert not wrong, f"{tier}: gRPC calls during the drain ended {wrong[:3]}"
    assert seconds < STOP_WITHIN_S, f"{tier} took {seconds:.1f}s to stop (its work ended long before)"


def long_stream(
    stack: Stack,
) -> Callable[[httpx.AsyncClient, Callable[[], None]], Coroutine[Any, Any, Outcome]]:
    def call(client: httpx.AsyncClient, started: Callable[[], None]) -> Coroutine[Any, Any, Outcome]:
        return stream_chat(client, stack, LONG_TOKENS, LONG_TEXT, on_first_event=started)

    return call


def short_chat(stack: Stack) -> Callable[[httpx.AsyncClient], Awaitable[Outcome]]:
    count = 0

    def call(client: httpx.AsyncClient) -> Awaitable[Outcome]:
        nonlocal count
        count += 1
        text = f"Say hello to probe {count}."
        # Alternately unary and streamed: a stream refused before its first event is an HTTP 503 too.
        if count % 2:
            return unary_chat(client, stack, 2, text)
        return stream_chat(client, stack, 2, text)

    return call


@pytest.mark.parametrize("name", ["generator", "gateway"])
def test_sigterm_lets_streams_finish_and_refuses_new_work_with_retry_after(stack: Stack, name: str) -> None:
    tier = stack.generator if name == "generator" else stack.gateway

    async def case() -> None:
        done, probes, grpc_probes, seconds = await drain(stack, tier, long_stream(stack), short_chat(stack))
        recovered = await restart(stack, tier, short_chat(stack))
        check_and_report(name, done, probes, grpc_probes, seconds, recovered)

    asyncio.run(case())


def test_sigterm_to_the_embedder_finishes_its_requests_and_refuses_new_ones(stack: Stack) -> None:
    async def in_flight(client: httpx.AsyncClient, started: Callable[[], None]) -> Outcome:
        # Many inputs, so that the requests are still being batched when the signal lands.
        call = asyncio.ensure_future(embed(client, stack, inputs=128))
        await asyncio.sleep(0.3)
        started()
        return await call

    def probe(client: httpx.AsyncClient) -> Awaitable[Outcome]:
        return embed(client, stack, inputs=2)

    async def case() -> None:
        done, probes, grpc_probes, seconds = await drain(stack, stack.embedder, in_flight, probe)
        recovered = await restart(stack, stack.embedder, probe)
        check_and_report("embedder", done, probes, grpc_probes, seconds, recovered)

    asyncio.run(case())


# --- two gateways behind one Envoy ---------------------------------------------------------

PAIR_WORKERS = 4
# Envoy's health checks see a drain after 2 failures 2 s apart (4-10 s): the load runs past that.
PAIR_AFTER_SIGNAL_S = 12.0


HELD_TOKENS = 48


HELD_STREAMS = 3


async def long_grpc_stream(stack: Stack, address: str, prompt: str, started: Callable[[], None]) -> int:
    """A GenerateStream straight to the gateway at `address` (up to HELD_TOKENS, which take
    seconds): how many messages it got; `started` is called at the first."""
    request = generation_pb2.GenerateStreamRequest(
        prompt=prompt, parameters=common_pb2.SamplingParameters(max_new_tokens=HELD_TOKENS)
    )
    metadata = (("authorization", f"Bearer {stack.keys['user']}"),)
    received = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        async for _ in stub.GenerateStream(request, metadata=metadata, timeout=GRACE_S):
            received += 1
            if received == 1:
                started()
    return received


def start_envoy_for(addresses: list[str], workdir: Path) -> tuple[ServiceProcess, str]:
    """Envoy from envoy/envoy.yaml on free ports with every gateway of `addresses` in its gateway
    cluster, once it answers /healthz."""
    listen_port, admin_port = free_port(), free_port()
    config = yaml.safe_load(render_envoy(listen_port, admin_port, addresses[0], descriptor_for_envoy()))
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "gateway"]
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}
                for host, port in (address.rsplit(":", 1) for address in addresses)
            ]
        }
    ]
    path = workdir / "envoy-pair.yaml"
    path.write_text(yaml.safe_dump(config, width=1 << 20, sort_keys=False))
    process, url = run_envoy(path, "envoy-pair", listen_port)
    return process, url


def test_a_draining_gateway_beside_another_costs_clients_nothing(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Regression: a draining gateway refused at once (503) while Envoy went on sending to it
    until its health checks failed twice, and did not retry elsewhere (gRPC UNAVAILABLE is no
    connect failure): its refusals now carry x-gateway-draining, which Envoy retries."""
    second = dataclasses.replace(stack.gateway, name="gateway-2", port=free_port(), process=None).start()
    envoy: ServiceProcess | None = None
    try:
        envoy, url = start_envoy_for([stack.gateway.address, second.address], tmp_path_factory.mktemp("pair"))
        pair = dataclasses.replace(stack, url=url)

        async def case() -> tuple[list[Outcome], float]:
            outcomes: list[Outcome] = []
            call = short_chat(pair)
            stop_at: float | None = None
            async with client_for(pair, connections=16) as client:

                async def worker() -> None:
                    while stop_at is None or time.monotonic() < stop_at:
                        outcomes.append(await bounded(call(client)))

                workers = [asyncio.create_task(worker()) for _ in range(PAIR_WORKERS)]
                # Long streams on the second gateway keep it draining (and refusing) for a while.
                running = [asyncio.Event() for _ in range(HELD_STREAMS)]
                held = [
                    asyncio.create_task(long_grpc_stream(pair, second.address, f"{LONG_TEXT} {n}", event.set))
                    for n, event in enumerate(running)
                ]
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in running)), 120)
                # Calls get through before the signal (Envoy's first health checks passed).
                waited = time.monotonic()
                while time.monotonic() - waited < 120:
                    if len(outcomes) >= PAIR_WORKERS:
                        break
                    await asyncio.sleep(0.2)
                before = len(outcomes)
                assert second.process is not None
                signalled = time.monotonic()
                second.process.send_signal(signal.SIGTERM)
                stop_at = signalled + PAIR_AFTER_SIGNAL_S
                while time.monotonic() - signalled < GRACE_S + 30:
                    if not second.process.alive():
                        break
                    await asyncio.sleep(0.2)
                exited = time.monotonic() - signalled
                stop_at = max(stop_at, time.monotonic() + 2.0)
                await asyncio.gather(*workers)
                # Cut off, a stream would raise its status here.
                await asyncio.gather(*held)
            assert before > 0, "no call finished before the signal"
            return outcomes, exited

        outcomes, exited = asyncio.run(case())
        failed = [(o.status, o.detail[:300]) for o in outcomes if not (o.status == 200 and o.complete)]
        refused = [detail for status, detail in failed if "shutting down" in detail]
        report(
            "drain",
            tier="gateway of two",
            calls=len(outcomes),
            refused_draining=len(refused),
            failed=len(failed),
            seconds=exited,
        )
        assert not refused, f"{len(refused)} refusals of the draining gateway reached clients: {refused[:2]}"
        # Other failures (none in runs here since Envoy may retry every refused request, before
        # that a few in hundreds as the port closed) are counted in the figures, not asserted.
        assert exited < STOP_WITHIN_S, f"the draining gateway took {exited:.1f}s to stop"
    finally:
        if envoy is not None:
            envoy.stop(grace=5)
        second.stop(grace=10)
