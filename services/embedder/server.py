"""The embedder process: gRPC server, health, reflection, metrics and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from inference.v1 import embedding_pb2, embedding_pb2_grpc, info_pb2, info_pb2_grpc
from prometheus_client import start_http_server

from services.common import keepalive, telemetry, tls
from services.common.interceptors import serving_interceptor
from services.common.machine import runtime_threads
from services.embedder.config import EmbedderConfig
from services.embedder.engine import EmbeddingEngine
from services.embedder.errors import MAPPING
from services.embedder.metrics import EmbedderRequests
from services.embedder.servicer import EmbeddingServicer, InfoServicer

log = logging.getLogger("services.embedder")

SERVICES = (
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    info_pb2.DESCRIPTOR.services_by_name["InfoService"].full_name,
)
MESSAGE_LIMIT = 64 * 1024 * 1024


async def _set_all(
    health: HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
) -> None:
    for name in ("", *SERVICES):
        await health.set(name, status)


async def serve(config: EmbedderConfig) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    if not config.allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
    # torch and ONNX Runtime (which copies torch's count) take no more threads than this process's cores.
    threads = runtime_threads(config.torch_threads, "--torch-threads")
    torch.set_num_threads(threads.count)
    log.info("model runtime threads: %s", threads.reason)
    engine = EmbeddingEngine(config)
    server = grpc.aio.server(
        interceptors=[
            *telemetry.server_interceptors("embedder", config.otlp_endpoint),
            serving_interceptor(EmbedderRequests(), MAPPING),
        ],
        options=[
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            *keepalive.server_options(),
        ],
    )
    address = f"{config.host}:{config.port}"
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(EmbeddingServicer(engine), server)
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(engine, address), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    await _set_all(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    tls.add_port(server, address, tls.files_of(config))
    await server.start()
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    log.info(
        "embedder listening on %s (metrics on %s), loading %s with %d threads",
        address,
        config.metrics_port,
        engine.default_name,
        torch.get_num_threads(),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    startup = asyncio.create_task(engine.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if startup.done():
        try:
            startup.result()
        except Exception:
            log.exception("the default model failed to load")
            exit_code = 1
            stop.set()
        else:
            await _set_all(health, health_pb2.HealthCheckResponse.SERVING)
            log.info("embedder serving %s on %s", engine.default_name, engine.device)
    await stopping
    still_loading = not startup.done()
    startup.cancel()

    log.info("shutting down: draining for up to %.0fs", config.shutdown_grace_s)
    await health.enter_graceful_shutdown()
    await engine.drain(config.shutdown_grace_s)
    # The drain already waited for the work; what is left are calls that never end on their own
    # (the gateways' health Watch streams), which must not hold the exit for the whole grace.
    await server.stop(1.0)
    await engine.stop()
    log.info("embedder stopped")
    if still_loading:
        # The load runs in a worker thread that cannot be interrupted, and the interpreter would
        # wait for it at exit: a SIGTERM would then take as long as the model takes to load.
        logging.shutdown()
        os._exit(exit_code)
    return exit_code
