"""The gateway killed (SIGKILL) and started again behind a running Envoy: during the gap REST
clients get a quick 503 with Retry-After and a JSON error, gRPC clients UNAVAILABLE, never a
hang; once the gateway serves again, requests through Envoy succeed within seconds."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.reliability.figures import report
from tests.reliability.stack import Outcome, Stack, client_for, start_stack, stream_chat, unary_chat

# A refusal slower than this counts as a hang.
QUICK_S = 3.0
GAP_PROBES = 10
# From SERVING to the first answer through Envoy, which includes generating it.
RECOVERY_S = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("gateway-restart"))
    yield started
    started.stop()


async def grpc_through_envoy(stack: Stack) -> grpc.StatusCode:
    """One native gRPC Generate through Envoy's listener: the status it ended with."""
    async with grpc.aio.insecure_channel(stack.url.removeprefix("http://")) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(
            prompt="Hello", parameters=common_pb2.SamplingParameters(max_new_tokens=2)
        )
        try:
            await stub.Generate(request, metadata=tuple(stack.headers().items()), timeout=QUICK_S)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def quick(call: asyncio.Future[Outcome] | asyncio.Task[Outcome]) -> Outcome:
    try:
        return await asyncio.wait_for(call, QUICK_S)
    except TimeoutError:
        return Outcome(0, detail="hung")


def test_killed_gateway_is_a_quick_503_then_serves_again(stack: Stack) -> None:
    async def case() -> None:
        async with client_for(stack, connections=16) as client:
            warm = await unary_chat(client, stack, 2, "Say hello before.")
            assert warm.status == 200, warm.detail
            assert stack.gateway.process is not None
            killed = time.monotonic()
            stack.gateway.process.send_signal(signal.SIGKILL)
            assert stack.gateway.process.process is not None
            stack.gateway.process.process.wait(timeout=10)
            gap: list[Outcome] = []
            codes: list[grpc.StatusCode] = []
            for i in range(GAP_PROBES):
                call = unary_chat if i % 2 else stream_chat
                gap.append(await quick(asyncio.ensure_future(call(client, stack, 2, f"Say hello {i}."))))
                codes.append(await grpc_through_envoy(stack))
            await asyncio.to_thread(stack.gateway.start)
            serving = time.monotonic()
            recovered: float | None = None
            attempts: list[tuple[float, int, str]] = []
            while time.monotonic() - serving < 60:
                # Not bounded by QUICK_S: on a busy machine the answer itself may take longer.
                outcome = await unary_chat(client, stack, 2, "Say hello after.")
                attempts.append((round(time.monotonic() - serving, 2), outcome.status, outcome.detail[:120]))
                if outcome.status == 200:
                    recovered = time.monotonic() - serving
                    break
                await asyncio.sleep(0.1)
            gap_seconds = time.monotonic() - killed
        report(
            "gateway_restart",
            gap_seconds=gap_seconds,
            refused_503=sum(o.status == 503 for o in gap),
            hung=sum(o.detail == "hung" for o in gap),
            slowest_refusal_s=max(o.seconds for o in gap),
            grpc_unavailable=sum(code == grpc.StatusCode.UNAVAILABLE for code in codes),
            recovered_after_s=-1.0 if recovered is None else recovered,
        )
        wrong = [(o.status, o.detail) for o in gap if o.status != 503 or not o.refusal_ok]
        assert not wrong, f"during the gap: {wrong[:3]}"
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
        assert recovered is not None and recovered < RECOVERY_S, (
            f"recovered after {recovered}: {attempts[:8]}"
        )

    asyncio.run(case())
