"""The gateway's drain: after SIGTERM new calls are refused with UNAVAILABLE and a RetryInfo while
those in flight finish; a backend's UNAVAILABLE (draining, or unreachable) always reaches the
client with a RetryInfo. No process, no network."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from services.common.errors import RpcFailure, error_info
from services.gateway import errors as gateway_errors
from services.gateway.server import Draining

# The wrapper never looks at the context.
CONTEXT: Any = None


def retry_delays(failure: RpcFailure) -> list[float]:
    return [
        d.retry_delay.ToNanoseconds() / 1e9
        for d in failure.details
        if isinstance(d, error_details_pb2.RetryInfo)
    ]


def reasons(failure: RpcFailure) -> list[str]:
    return [d.reason for d in failure.details if isinstance(d, error_details_pb2.ErrorInfo)]


def test_an_unreachable_backend_is_unavailable_with_a_retry_delay_and_no_internal_address() -> None:
    backend = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50052: Connection refused",
    )
    failure = gateway_errors.from_backend(backend)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert retry_delays(failure) == [gateway_errors.BACKEND_RETRY_SECONDS]
    assert reasons(failure) == ["BACKEND_UNAVAILABLE"]
    assert "10.0.0.7" not in failure.message


def test_a_draining_backend_without_retry_info_gets_one_and_keeps_its_reason() -> None:
    status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="shutting down")
    status.details.add().Pack(error_info("SHUTTING_DOWN", "inference.embedder"))
    backend = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((gateway_errors.STATUS_DETAILS_KEY, status.SerializeToString())),
        "shutting down",
    )
    failure = gateway_errors.from_backend(backend)
    assert retry_delays(failure) == [gateway_errors.BACKEND_RETRY_SECONDS]
    assert reasons(failure) == ["SHUTTING_DOWN"] and failure.message == "shutting down"


def test_other_backend_errors_get_no_retry_delay() -> None:
    backend = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad"
    )
    assert retry_delays(gateway_errors.from_backend(backend)) == []


async def collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


def test_draining_refuses_new_calls_and_waits_for_those_in_flight() -> None:
    async def scenario() -> None:
        draining = Draining()
        release = asyncio.Event()

        async def slow(request: Any, context: Any) -> str:
            await release.wait()
            return "done"

        async def stream(request: Any, context: Any) -> Any:
            await release.wait()
            yield "token"

        unary = draining.unary("/inference.v1.GenerationService/Generate", slow)
        streamed = draining.stream("/inference.v1.GenerationService/GenerateStream", stream)
        in_flight = asyncio.ensure_future(unary(None, CONTEXT))
        tokens = asyncio.ensure_future(collect(streamed(None, CONTEXT)))
        await asyncio.sleep(0)
        assert draining.in_flight == 2
        draining.start()
        with pytest.raises(RpcFailure) as refused:
            await unary(None, CONTEXT)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and retry_delays(refused.value)
        assert reasons(refused.value) == ["SHUTTING_DOWN"]
        assert not await draining.wait_idle(0.05)
        release.set()
        assert await in_flight == "done" and await tokens == ["token"]
        assert await draining.wait_idle(1.0) and draining.in_flight == 0

    asyncio.run(scenario())
