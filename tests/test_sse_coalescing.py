"""Coalesced SSE writes through the real gateway and generator: a client that reads nothing
for a while (events queue at the gateway) and then leaves still frees the generator's batch slot.
Order, completeness and [DONE] of coalesced writes: tests/unit/test_sse_coalescing.py."""

from __future__ import annotations

import time

import grpc
from google.api import httpbody_pb2  # type: ignore[import-untyped]
from inference.v1 import common_pb2, generation_pb2, info_pb2, info_pb2_grpc

from tests.fixtures_gateway import GatewayService

STORY = "Write a long story about a dragon."
METHOD = "/inference.v1.GenerationService/GenerateStreamEvents"
# A client window that stays small (no BDP probing): the gateway's writes wait while it sleeps.
SLOW_CLIENT = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def request(tokens: int) -> generation_pb2.GenerateStreamRequest:
    return generation_pb2.GenerateStreamRequest(
        messages=[common_pb2.ChatMessage(role="user", content=STORY)],
        parameters=common_pb2.SamplingParameters(max_new_tokens=tokens, do_sample=False),
    )


def events_stream(
    channel: grpc.Channel,
) -> grpc.UnaryStreamMultiCallable[generation_pb2.GenerateStreamRequest, httpbody_pb2.HttpBody]:
    return channel.unary_stream(
        METHOD,
        request_serializer=generation_pb2.GenerateStreamRequest.SerializeToString,
        response_deserializer=httpbody_pb2.HttpBody.FromString,
    )


def running(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    return int(reply.components[0].requests_running)


def test_a_slow_client_that_leaves_frees_the_batch_slot(
    gateway_service: GatewayService, generator_address: str
) -> None:
    with grpc.insecure_channel(gateway_service.address, options=SLOW_CLIENT) as channel:
        replies = events_stream(channel)(request(3000), metadata=gateway_service.metadata(), timeout=300)
        next(replies)
        time.sleep(3)  # events queue at the gateway meanwhile
        assert running(generator_address) == 1
        replies.cancel()
    deadline = time.monotonic() + 10
    while running(generator_address) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(generator_address) == 0
