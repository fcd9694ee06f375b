"""Coalesced SSE writes through the real gateway and generator: a client slower than the
generator gets several events per HttpBody message of GenerateStreamEvents (the messages Envoy
passes on as HTTP chunks), every event whole, in order, none lost, [DONE] once at the end; and a
slow client that leaves still frees the generator's batch slot."""

from __future__ import annotations

import json
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


def payloads(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event[len("data: ") :] for event in events]


def running(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    return int(reply.components[0].requests_running)


def test_a_slow_client_gets_every_event_in_order_in_fewer_messages(gateway_service: GatewayService) -> None:
    with grpc.insecure_channel(gateway_service.address, options=SLOW_CLIENT) as channel:
        replies = events_stream(channel)(request(400), metadata=gateway_service.metadata(), timeout=300)
        bodies = [next(replies)]
        time.sleep(8)  # the generator runs on while this client reads nothing
        bodies.extend(replies)
    assert all(body.content_type == "text/event-stream" for body in bodies)
    sent = [item for body in bodies for item in payloads(body.data)]
    assert sent[-1] == "[DONE]" and sent.count("[DONE]") == 1
    events = [json.loads(item) for item in sent[:-1]]
    final = events[-1]
    assert final["usage"]["completion_tokens"] == final["tokens_generated"] == len(events)
    assert "".join(event["token"]["text"] for event in events) == final["generated_text"]
    # Events queued while the writes waited went out together.
    assert len(bodies) < len(sent) / 2, (len(bodies), len(sent))
    assert max(len(payloads(body.data)) for body in bodies) > 5


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
