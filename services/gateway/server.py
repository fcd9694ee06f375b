"""Builds and runs the gateway's grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from inference.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    openai_pb2,
    openai_pb2_grpc,
)
from prometheus_client import start_http_server

from services.common import keepalive, tls
from services.common import telemetry as common_telemetry
from services.common.interceptors import serving_interceptor
from services.gateway import telemetry, validation
from services.gateway.auth import Authentication, KeyStore, jwt_settings
from services.gateway.backends import MAX_MESSAGE_BYTES, Backend, Backends, ResponseCache
from services.gateway.catalog import ModelCatalog
from services.gateway.config import GatewayConfig
from services.gateway.errors import MAPPING
from services.gateway.metrics import GatewayRequests, GatewayStats
from services.gateway.ratelimit import Limiter, RateLimiter, RateLimiting, RateLimits
from services.gateway.ratelimit_redis import RedisRateLimiter
from services.gateway.servicers import EmbeddingServicer, GenerationServicer, InfoServicer, OpenAIServicer

log = logging.getLogger("services.gateway")

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    info_pb2.DESCRIPTOR.services_by_name["InfoService"].full_name,
    openai_pb2.DESCRIPTOR.services_by_name["OpenAIService"].full_name,
)


@dataclass
class Gateway:
    server: grpc.aio.Server
    backends: Backends
    port: int
    limiter: Limiter | None = None

    async def stop(self, grace: float = 2.0) -> None:
        await self.server.stop(grace)
        await self.backends.close()
        if self.limiter is not None:
            await self.limiter.close()


async def build(config: GatewayConfig) -> Gateway:
    store = KeyStore(config.api_keys_file, config.api_keys)
    jwt = jwt_settings(config.jwt_claims_header, config.jwt_scope_claim, config.jwt_scope_map)
    if jwt is not None:
        log.info(
            "JWTs on: trusting verified claims in %r (reach this gateway through Envoy only)",
            jwt.claims_header,
        )
    if store.open and jwt is None:
        log.warning("no API keys configured: the gateway is OPEN to every client (set --api-keys-file)")
    provider = (
        common_telemetry.setup_tracing("gateway", common_telemetry.otlp_endpoint(config.otlp_endpoint))
        if config.tracing
        else None
    )
    client_interceptors: list[Any] = list(telemetry.client_interceptors(provider)) if provider else []
    tracing = provider is not None
    generator = Backend(
        "generator",
        config.generator_addresses,
        config.retry_attempts,
        client_interceptors,
        tracing,
        tls_files=tls.files_of(config),
    )
    embedder = Backend(
        "embedder",
        config.embedder_addresses,
        config.retry_attempts,
        client_interceptors,
        tracing,
        tls_files=tls.files_of(config),
    )
    backends = Backends(generator, embedder, ResponseCache(config.cache_size))
    catalog = ModelCatalog(generator, embedder)
    stats = GatewayStats()
    limiter = await build_limiter(config)
    limits = validation.RequestLimits(
        max_prompt_chars=config.max_prompt_chars,
        max_messages=config.max_messages,
        max_new_tokens=config.max_new_tokens,
        max_sequences=config.max_sequences,
        max_stop_sequences=config.max_stop_sequences,
        max_embedding_inputs=config.max_embedding_inputs,
    )
    # Outermost first: the span (the same interceptor as the backends') covers everything, metrics
    # see the final status, errors raised by auth and limits are mapped to a status with details.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if provider is not None:
        interceptors.append(common_telemetry.tracing_interceptor(provider.get_tracer("services.gateway")))
    interceptors.append(
        serving_interceptor(
            GatewayRequests(stats), MAPPING, policies=[Authentication(store, jwt), RateLimiting(limiter)]
        )
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *keepalive.server_options(),
        ],
    )
    address = f"{config.host}:{config.port}"
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(backends, catalog, limits), server
    )
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingServicer(backends, catalog, limits), server
    )
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(backends, catalog, stats, address), server)
    openai_pb2_grpc.add_OpenAIServiceServicer_to_server(
        OpenAIServicer(backends, catalog, limits, stats.started), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = tls.add_port(server, address, tls.files_of(config))
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Last: a build that failed above has opened no connection to Redis that would need closing.
    await limiter.start()
    return Gateway(server, backends, port, limiter)


async def build_limiter(config: GatewayConfig) -> Limiter:
    """Buckets in Redis when --redis-url is set (shared by every gateway; connected by its
    `start`, which `build` calls last), else in this process."""
    default = RateLimits(
        config.default_requests_per_minute, config.default_tokens_per_minute, config.default_burst
    )
    if not config.redis_url:
        return RateLimiter(default)
    return RedisRateLimiter(
        default,
        config.redis_url,
        config.redis_key_prefix,
        config.redis_timeout,
        config.redis_retry_seconds,
        max_connections=config.redis_max_connections,
    )


async def serve(config: GatewayConfig) -> None:
    gateway = await build(config)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    await gateway.server.start()
    log.info(
        "gateway on %s:%d (metrics :%d); generator %s, embedder %s",
        config.host,
        gateway.port,
        config.metrics_port,
        gateway.backends.generator.target,
        gateway.backends.embedder.target,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await gateway.stop()
