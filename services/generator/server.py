"""The generator process: gRPC server, health, reflection, metrics, model loading, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import replace

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from inference.v1 import generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc
from prometheus_client import start_http_server

from services.common import keepalive, telemetry, tls
from services.common.interceptors import serving_interceptor
from services.common.machine import runtime_threads
from services.common.sampling import DEFAULT_LIMITS
from services.generator import errors
from services.generator.config import GeneratorConfig
from services.generator.engine import Engine, SamplingParams, SchedulerLimits
from services.generator.loader import LoadSpec, ModelLoadError, load
from services.generator.metrics import GeneratorRequests
from services.generator.servicer import GenerationServicer, InfoServicer, ServedInfo

log = logging.getLogger("services.generator")

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    info_pb2.DESCRIPTOR.services_by_name["InfoService"].full_name,
)


def limits_of(config: GeneratorConfig) -> SchedulerLimits:
    return SchedulerLimits(
        max_running_sequences=config.max_running_sequences,
        max_waiting_requests=config.max_waiting_requests,
        max_total_tokens=config.max_total_tokens,
        max_prefill_tokens=config.max_prefill_tokens,
        max_step_tokens=config.max_step_tokens,
        max_model_len=config.max_model_len,
        sampling=replace(
            DEFAULT_LIMITS,
            max_new_tokens=config.max_new_tokens_limit,
            max_num_return_sequences=config.max_num_return_sequences,
            max_num_beams=config.max_num_beams,
            max_stop_sequences=config.max_stop_sequences,
        ),
    )


async def _set_health(
    health: health_aio.HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
) -> None:
    for name in ("", *SERVICE_NAMES):
        await health.set(name, status)


async def _warm_up(engine: Engine) -> None:
    """One batched and one single generation, so that the first user does not pay for lazy setup."""
    prompt = engine.encode_prompt("Hello, my name is")
    greedy = SamplingParams(max_new_tokens=4)
    sampled = SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9, top_k=50, seed=1)
    await asyncio.gather(engine.generate(prompt, greedy), engine.generate(prompt, sampled))


async def serve(config: GeneratorConfig) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # Every runtime (torch, ONNX Runtime, the GGUF kernel's OpenMP) takes this many threads: more
    # than the cores this process is given oversubscribes them (two replicas on two cores: 7x slower).
    threads = runtime_threads(config.threads, "--threads")
    torch.set_num_threads(threads.count)
    log.info("model runtime threads: %s", threads.reason)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
        log.info("metrics on :%d/metrics", config.metrics_port)

    address = f"{config.host}:{config.port}"
    info = ServedInfo(address=address, started_at=time.monotonic())
    server = grpc.aio.server(
        interceptors=[
            *telemetry.server_interceptors("generator", config.otlp_endpoint),
            serving_interceptor(GeneratorRequests(info.tally), errors.MAPPING),
        ],
        options=keepalive.server_options(),
    )
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(info, config.default_max_new_tokens), server
    )
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(info), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    tls.add_port(server, address, tls.files_of(config))
    await server.start()
    log.info("gRPC on %s (NOT_SERVING until the model is loaded and warmed up)", address)

    spec = LoadSpec(
        model=config.model,
        gguf_file=config.gguf_file,
        cache_dir=config.cache_dir,
        dtype=config.dtype,
        device=config.device,
        quantization=config.quantization,
        attn_implementation=config.attn_implementation,
        single_row_gemv=config.single_row_gemv,
        backend=config.backend,
        onnx_precision=config.onnx_precision,
        threads=threads.count,
        prefix_cache_mib=config.prefix_cache_mib,
        gguf_activations=config.gguf_activations,
        decode_isa=config.decode_isa,
    )
    loading = asyncio.ensure_future(asyncio.to_thread(load, spec))
    waiter = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({loading, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.info("stopped while loading")
        await server.stop(0)
        # The load runs in a worker thread that cannot be interrupted, and the interpreter would
        # wait for it at exit (26 s for a first GGUF load). Its cache folder is written under a
        # temporary name and renamed when complete, so leaving now corrupts nothing.
        logging.shutdown()
        os._exit(0)
    try:
        loaded = loading.result()
    except ModelLoadError as error:
        log.error("cannot start: %s", error)
        await server.stop(0)
        return 2
    engine = Engine(loaded.runner, loaded.tokenizer, config.model_id or loaded.model_id, limits_of(config))
    engine.start()
    if config.warmup:
        started = time.monotonic()
        await _warm_up(engine)
        log.info("warmed up in %.1f s", time.monotonic() - started)
    info.engine = engine
    info.source = loaded.source
    info.dtype = loaded.precision
    info.device = loaded.device
    info.message = ""
    await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s from %s (%s, %s on %s)",
        engine.model_id,
        loaded.source,
        loaded.runner.backend,
        info.dtype,
        info.device,
    )

    await waiter
    log.info(
        "shutting down: no new requests, up to %.0f s for the ones in flight", config.shutdown_grace_seconds
    )
    info.message = "shutting down"
    engine.stop_admitting()
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    finished = await engine.wait_idle(config.shutdown_grace_seconds)
    if not finished:
        log.warning("grace period over with requests still running; they are cut off")
    await server.stop(1.0)
    await engine.close()
    log.info("stopped")
    return 0


def run(config: GeneratorConfig) -> int:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Models load from the installed packages or local folders; never reach out to the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return asyncio.run(serve(config))
