"""Pools by model over real processes: three generators serving the default GGUF under two model
ids (one replica of model-a, two of model-b) behind one gateway. Every request reaches a replica
of its model (zero NOT_FOUND), the model lists carry the replica counts, /health and /stats list
every replica, and killing one model-b replica under load fails no request started after that."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import grpc.aio
import httpx2
import pytest
from inference.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    openai_pb2,
    openai_pb2_grpc,
)

from tests.fixtures_embedder import EmbedderHandle, start_embedder
from tests.fixtures_gateway import EnvoyService, descriptor_for_envoy, start_envoy, start_gateway
from tests.reliability.replicas_stack import EMBEDDER_ARGS, GENERATOR_ARGS, ModelReplica
from tests.stack import ServiceProcess

# A request that takes longer than this counts as hung.
REQUEST_TIMEOUT_S = 60.0


class NamedGenerator(ModelReplica):
    """A generator replica serving the default GGUF under `model_id`."""

    def __init__(self, model_id: str) -> None:
        super().__init__("generator")
        self.model_id = model_id

    def start(self) -> NamedGenerator:
        self.starts += 1
        self.process = ServiceProcess.python_module(
            f"generator-{self.model_id}-{self.port}",
            "services.generator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--model-id",
            self.model_id,
            *GENERATOR_ARGS,
            env={"HF_HUB_OFFLINE": "1"},
        ).start()
        return self


@dataclass
class PoolStack:
    model_a: NamedGenerator
    model_b: list[NamedGenerator]
    embedder: EmbedderHandle
    gateway: ServiceProcess
    address: str
    envoy: EnvoyService


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolStack]:
    generators = [NamedGenerator("model-a"), NamedGenerator("model-b"), NamedGenerator("model-b")]
    embedder: EmbedderHandle | None = None
    gateway: ServiceProcess | None = None
    envoy: EnvoyService | None = None
    try:
        for generator in generators:
            generator.start()
        embedder = start_embedder(*EMBEDDER_ARGS)
        for generator in generators:
            generator.wait_until_serving()
        gateway, address, _ = start_gateway(
            ",".join(generator.address for generator in generators),
            embedder.address,
            ("--cache-size", "0", "--tracing", "false", "--metrics-port", "0"),
            name="gateway-model-pools",
        )
        envoy = start_envoy(
            address, tmp_path_factory.mktemp("envoy-model-pools"), "envoy-model-pools", descriptor_for_envoy()
        )
        yield PoolStack(generators[0], generators[1:], embedder, gateway, address, envoy)
    finally:
        if envoy is not None:
            envoy.process.stop()
        if gateway is not None:
            gateway.stop()
        if embedder is not None:
            embedder.process.stop()
        for generator in generators:
            generator.stop()


def generate(stub: generation_pb2_grpc.GenerationServiceStub, model: str, number: int) -> str:
    request = generation_pb2.GenerateRequest(
        prompt=f"Question {number}:",
        model=model,
        parameters=common_pb2.SamplingParameters(max_new_tokens=2),
    )
    return str(stub.Generate(request, timeout=REQUEST_TIMEOUT_S).model)


def test_every_request_reaches_a_replica_of_its_model(pools: PoolStack) -> None:
    with grpc.insecure_channel(pools.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        answered = [generate(stub, model, number) for number in range(6) for model in ("model-a", "model-b")]
        assert answered == ["model-a", "model-b"] * 6
        with pytest.raises(grpc.RpcError) as refused:
            generate(stub, "model-c", 0)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model-a" in str(refused.value.details()) and "model-b" in str(refused.value.details())


def test_rest_requests_reach_their_model_and_an_unknown_one_is_404(pools: PoolStack) -> None:
    with httpx2.Client(base_url=pools.envoy.url, timeout=REQUEST_TIMEOUT_S) as client:
        for model in ("model-b", "model-a", "model-b"):
            reply = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
            assert reply.status_code == 200 and reply.json()["model"] == model, reply.text
        refused = client.post(
            "/v1/completions", json={"model": "model-c", "prompt": "Hello", "max_tokens": 2}
        )
        assert refused.status_code == 404 and "model-a" in refused.text and "model-b" in refused.text
        replicas = {model["id"]: model["replicas"] for model in client.get("/v1/models").json()["data"]}
        assert replicas["model-a"] == 1 and replicas["model-b"] == 2, replicas
        assert all(count >= 1 for count in replicas.values()), replicas
        assert client.get("/v1/models/model-b").status_code == 200


def test_the_model_lists_count_the_replicas(pools: PoolStack) -> None:
    with grpc.insecure_channel(pools.address) as channel:
        listed = openai_pb2_grpc.OpenAIServiceStub(channel).ListModels(
            openai_pb2.ListModelsRequest(), timeout=10
        )
        replicas = {model.id: model.replicas for model in listed.data}
        assert replicas["model-a"] == 1 and replicas["model-b"] == 2
        served = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
            info_pb2.ListServedModelsRequest(), timeout=10
        )
        assert {model.id: model.replicas for model in served.models}["model-b"] == 2


def test_health_and_stats_list_every_replica(pools: PoolStack) -> None:
    generators = {pools.model_a.address, *(replica.address for replica in pools.model_b)}
    with grpc.insecure_channel(pools.address) as channel:
        info = info_pb2_grpc.InfoServiceStub(channel)
        health = info.GetHealth(info_pb2.GetHealthRequest(), timeout=10)
        listed = {part.address for part in health.components if part.component == "generator"}
        assert generators <= listed and health.status == info_pb2.SERVING_STATUS_SERVING
        stats = info.GetStats(info_pb2.GetStatsRequest(), timeout=10)
        assert generators <= {part.address for part in stats.components if part.component == "generator"}


async def stream(stub: generation_pb2_grpc.GenerationServiceAsyncStub, number: int) -> tuple[float, str]:
    """When the model-b stream started, and how it ended ("ok", "cut" for UNAVAILABLE after
    messages, else the failure)."""
    started = time.monotonic()
    request = generation_pb2.GenerateStreamRequest(
        prompt=f"Tale {number}: long ago",
        model="model-b",
        parameters=common_pb2.SamplingParameters(max_new_tokens=16, do_sample=True),
    )
    messages = 0
    try:
        async for _ in stub.GenerateStream(request, timeout=REQUEST_TIMEOUT_S):
            messages += 1
    except grpc.aio.AioRpcError as error:
        if messages and error.code() == grpc.StatusCode.UNAVAILABLE:
            return started, "cut"
        return started, f"failed: {error.code().name} {error.details()}"
    return started, "ok"


async def test_losing_a_replica_of_a_model_fails_no_later_request(pools: PoolStack) -> None:
    outcomes: list[tuple[float, str]] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(pools.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def client(first: int) -> None:
            number = first
            while not stop.is_set():
                outcomes.append(await stream(stub, number))
                number += 100

        clients = [asyncio.create_task(client(number)) for number in range(3)]
        await asyncio.sleep(4.0)
        await asyncio.to_thread(pools.model_b[1].kill)
        killed = time.monotonic()
        await asyncio.sleep(8.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), REQUEST_TIMEOUT_S)
    after = [outcome for started, outcome in outcomes if started >= killed]
    before = [outcome for started, outcome in outcomes if started < killed]
    assert after and all(outcome == "ok" for outcome in after), after
    assert all(outcome in ("ok", "cut") for outcome in before), before
