"""Routing on a real stack: round-robin over two generator replicas, no failed request when one
stops, an in-band error event when a stream's backend dies, and a REST client that drops its
stream freeing the generator's batch slot at once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import grpc
import httpx2
import openai
import pytest
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc
from openai import OpenAI

from tests.fixtures_gateway import GatewayService, start_envoy, start_gateway
from tests.fixtures_generator import GeneratorService, start_generator


def generator_stats(address: str) -> info_pb2.ComponentStats:
    with grpc.insecure_channel(address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    return reply.components[0]


@pytest.fixture(scope="module")
def second_generator() -> Iterator[GeneratorService]:
    service = start_generator()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def replicated_gateway(
    generator_address: str, second_generator: GeneratorService, embedder_address: str
) -> Iterator[str]:
    process, address, _ = start_gateway(
        f"{generator_address},{second_generator.address}",
        embedder_address,
        ("--cache-size", "0", "--tracing", "false", "--metrics-port", "0"),
        name="gateway-replicas",
    )
    yield address
    process.stop()


@pytest.fixture(scope="module")
def solo_stack(
    second_generator: GeneratorService, embedder_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Envoy and a gateway whose only generator is the second replica."""
    process, address, _ = start_gateway(
        second_generator.address,
        embedder_address,
        ("--tracing", "false", "--metrics-port", "0"),
        name="gateway-solo",
    )
    envoy = start_envoy(address, tmp_path_factory.mktemp("envoy-solo"), name="envoy-solo")
    yield envoy.url
    envoy.process.stop()
    process.stop()


def generate(address: str, prompt: str) -> generation_pb2.GenerateResponse:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply: generation_pb2.GenerateResponse = stub.Generate(
            generation_pb2.GenerateRequest(
                prompt=prompt, parameters=common_pb2.SamplingParameters(max_new_tokens=1)
            ),
            timeout=120,
        )
        return reply


def test_both_replicas_receive_traffic(
    replicated_gateway: str, generator_address: str, second_generator: GeneratorService
) -> None:
    before = [generator_stats(a).requests_total for a in (generator_address, second_generator.address)]
    with grpc.insecure_channel(replicated_gateway) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for number in range(8):
            request = generation_pb2.GenerateRequest(
                prompt=f"Number {number}:", parameters=common_pb2.SamplingParameters(max_new_tokens=1)
            )
            stub.Generate(request, timeout=120)
    after = [generator_stats(a).requests_total for a in (generator_address, second_generator.address)]
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) >= 8 and all(count >= 2 for count in served), served


def test_a_stream_whose_backend_dies_ends_with_an_in_band_error(
    solo_stack: str, second_generator: GeneratorService
) -> None:
    with OpenAI(base_url=f"{solo_stack}/v1", api_key="open", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        stream = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=200, stream=True
        )
        received = 0
        with pytest.raises(openai.APIError) as failed:
            for _ in stream:
                received += 1
                if received == 2:
                    second_generator.process.send_signal(signal.SIGKILL)
    # The SDK raises on the in-band error event; a clean end would have returned normally.
    assert received >= 2 and str(failed.value)


def test_raw_sse_of_a_failed_stream_has_an_error_event_and_no_done(solo_stack: str) -> None:
    # The only generator of this stack is gone: the failure comes before the first event, so it
    # is an HTTP status, not a 200 that ends cleanly.
    request = {"model": "x", "prompt": "Hi", "max_tokens": 5, "stream": True}
    with httpx2.stream("POST", f"{solo_stack}/v1/completions", json=request, timeout=60) as reply:
        text = reply.read().decode()
    assert reply.status_code >= 400 and "[DONE]" not in text


def test_stopping_one_replica_fails_no_new_request(
    replicated_gateway: str, second_generator: GeneratorService
) -> None:
    second_generator.stop(grace=5)
    for number in range(6):
        reply = generate(replicated_gateway, f"After the stop {number}:")
        assert reply.tokens_generated >= 1


def test_a_dropped_rest_stream_frees_the_generators_batch_slot(
    envoy_url: str, gateway_service: GatewayService, generator_address: str
) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    # Greedy, this story runs past 3,000 tokens: the stream must still be running when the client
    # drops it (400 tokens took only 4-5 s once decoding got fast, and a busy run read the first
    # events later than that).
    request = {"messages": story, "stream": True, "parameters": {"max_new_tokens": 3000, "do_sample": False}}
    with (
        httpx2.Client(base_url=envoy_url, headers=gateway_service.headers(), timeout=120) as client,
        client.stream("POST", "/generate", json=request) as reply,
    ):
        assert reply.status_code == 200
        events = 0
        for line in reply.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["finish_reason"] == "FINISH_REASON_UNSPECIFIED"
                events += 1
                if events == 3:
                    break
        # Polled: a full run once read 0 here, in a way no rerun reproduced; the stats say more.
        deadline = time.monotonic() + 10
        stats = generator_stats(generator_address)
        while stats.requests_running != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = generator_stats(generator_address)
        assert stats.requests_running == 1, str(stats)
    # The connection is closed here, long before 3,000 tokens.
    deadline = time.monotonic() + 5
    running = generator_stats(generator_address).requests_running
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = generator_stats(generator_address).requests_running
    assert running == 0
