"""The embedder process: health, reflection, info, metrics, and start-up failure."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inference.v1 import info_pb2, info_pb2_grpc

from tests.fixtures_embedder import DEFAULT_EMBEDDING_MODEL, EmbedderHandle
from tests.stack import ServiceProcess, free_port, health_status, sigterm_while_loading

TIMEOUT = 30.0
SERVICES = ["inference.v1.EmbeddingService", "inference.v1.InfoService"]


async def test_health_reports_serving_for_the_server_and_each_service(
    embedder_service: EmbedderHandle,
) -> None:
    async with grpc.aio.insecure_channel(embedder_service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ["", *SERVICES]:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_the_services(embedder_service: EmbedderHandle) -> None:
    async with grpc.aio.insecure_channel(embedder_service.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        stream = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names: list[str] = []
        async for reply in stream:
            names = [service.name for service in reply.list_services_response.service]
            break
    assert set(SERVICES) | {"grpc.health.v1.Health"} <= set(names)


async def test_info_service_reports_device_memory_models_and_stats(
    embedder_info_stub: info_pb2_grpc.InfoServiceAsyncStub,
) -> None:
    health = await embedder_info_stub.GetHealth(info_pb2.GetHealthRequest(), timeout=TIMEOUT)
    assert health.status == info_pb2.SERVING_STATUS_SERVING
    component = health.components[0]
    assert component.component == "embedder" and component.device.type == "cpu"
    assert component.memory.process_rss_mib > 50 and component.memory.system_total_mib > 0
    assert DEFAULT_EMBEDDING_MODEL in component.models
    models = await embedder_info_stub.ListServedModels(info_pb2.ListServedModelsRequest(), timeout=TIMEOUT)
    default = {model.id: model for model in models.models}[DEFAULT_EMBEDDING_MODEL]
    assert default.task == "embedding" and default.dimensions == 384 and default.max_sequence_length == 256
    # "float32", or "float32 (bf16 autocast)" where auto picks bf16 on this CPU.
    assert default.dtype in ("float32", "float32 (bf16 autocast)") and default.loaded
    stats = await embedder_info_stub.GetStats(info_pb2.GetStatsRequest(), timeout=TIMEOUT)
    assert stats.components[0].component == "embedder"
    assert stats.components[0].uptime_seconds > 0


def test_metrics_port_exports_embedder_metrics(embedder_service: EmbedderHandle) -> None:
    url = f"http://127.0.0.1:{embedder_service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for name in (
        "embedder_requests_total",
        "embedder_batch_size_bucket",
        "embedder_batch_tokens_bucket",
        "embedder_queue_seconds_bucket",
        "embedder_inference_seconds_bucket",
        "embedder_cache_hits_total",
        "embedder_cache_evictions_total",
        "embedder_loaded_models",
    ):
        assert name in text, name


def test_an_unloadable_default_model_never_reports_serving_and_exits_nonzero(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text("[]")
    port = free_port()
    process = ServiceProcess.python_module(
        "embedder-broken",
        "services.embedder",
        "--host=127.0.0.1",
        f"--port={port}",
        "--metrics-port=0",
        f"--default-model={tmp_path}",
        env={"HF_HUB_OFFLINE": "1"},
    ).start()
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    try:
        while process.alive() and time.monotonic() < deadline:
            seen.add(health_status(f"127.0.0.1:{port}", timeout=1.0))
            time.sleep(0.1)
        assert not process.alive(), "the embedder kept running without its default model"
        assert "SERVING" not in seen
        assert "NOT_SERVING" in seen, seen
        assert process.process is not None and process.process.returncode == 1
        assert "the default model failed to load" in process.log_tail()
    finally:
        process.stop()


def test_sigterm_while_the_model_loads_exits_at_once() -> None:
    seconds, code, log_tail = sigterm_while_loading(
        "embedder-loading", "services.embedder", env={"HF_HUB_OFFLINE": "1"}
    )
    # Waiting for the load to finish took 4 s here; leaving at once takes milliseconds.
    assert seconds < 2.0, log_tail
    assert code == 0, log_tail
