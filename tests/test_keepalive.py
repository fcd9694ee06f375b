"""A server of the stack accepts its clients' keepalive pings: an idle health watch (what a
channel's client-side health checking holds open) never makes the server close the link."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import keepalive

INTERVAL_MS = 500  # the policy scaled down, so that a few seconds hold many pings


async def failures_after_an_idle_watch(server_options: Sequence[tuple[str, int]]) -> list[str]:
    """Unary checks made while a Watch stream sits idle and the client pings; their failures."""
    server = grpc.aio.server(options=list(server_options))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=keepalive.client_options(INTERVAL_MS))
    failures = []
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        await asyncio.wait_for(watch.read(), 10)
        for _ in range(3):
            await asyncio.sleep(8 * INTERVAL_MS / 1000)
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
        watch.cancel()
    finally:
        await channel.close()
        await server.stop(0)
    return failures


async def test_the_servers_policy_accepts_the_clients_pings() -> None:
    assert await failures_after_an_idle_watch(keepalive.server_options(INTERVAL_MS)) == []


async def test_grpcs_default_policy_refuses_them() -> None:
    """The control: without the policy the same pings end the link (the bug this prevents)."""
    failures = await failures_after_an_idle_watch([])
    assert any("Too many pings" in failure for failure in failures), failures
