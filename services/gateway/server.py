"""Builds and runs the gateway's grpc.aio server."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
from services.common.interceptors import (
    BehaviorWrapper,
    Context,
    StreamBehavior,
    UnaryBehavior,
    serving_interceptor,
)
from services.gateway import routing, telemetry, validation
from services.gateway.auth import Authentication, KeyStore, jwt_settings
from services.gateway.backends import MAX_MESSAGE_BYTES, Backend, Backends, ResponseCache
from services.gateway.catalog import ModelCatalog
from services.gateway.config import GatewayConfig
from services.gateway.errors import MAPPING, unavailable
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


# Marks a refusal by a draining gateway: nothing ran, so Envoy retries it on another gateway
# (retry_on retriable-headers) rather than answer 503 until its health checks see the drain.
DRAINING_HEADER = "x-gateway-draining"
WATCH_LOAD = "/inference.v1.InfoService/WatchLoad"


class Draining(BehaviorWrapper):
    """Counts the inference calls in flight; once `start` is called, refuses new ones with
    UNAVAILABLE, a RetryInfo and DRAINING_HEADER (Envoy or a client retries elsewhere or later)
    while those in flight run on."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self.draining = True

    async def wait_idle(self, grace: float) -> bool:
        """Whether every call in flight finished within `grace` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    def _admit(self) -> None:
        if self.draining:
            refusal = unavailable("the gateway is shutting down; retry shortly", "SHUTTING_DOWN")
            raise dataclasses.replace(refusal, trailers=((DRAINING_HEADER, "1"),))
        self.in_flight += 1
        self._idle.clear()

    def _release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def counted(request: Any, context: Context) -> Any:
            self._admit()
            try:
                return await behavior(request, context)
            finally:
                self._release()

        return counted

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        if method == WATCH_LOAD:
            return behavior  # ends by itself on drain: a drain must not wait for it

        async def counted(request: Any, context: Context) -> AsyncIterator[Any]:
            self._admit()
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._release()

        return counted


@dataclass
class Gateway:
    server: grpc.aio.Server
    backends: Backends
    port: int
    limiter: Limiter | None = None
    health: health.aio.HealthServicer | None = None
    draining: Draining = field(default_factory=Draining)

    async def drain(self, grace: float) -> bool:
        """Report NOT_SERVING, refuse new calls and wait up to `grace` seconds for those in
        flight; whether they all finished."""
        self.draining.start()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        return await self.draining.wait_idle(grace)

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
        policy_factory=functools.partial(routing.make_policy, config),
        model_refresh_s=config.model_refresh_seconds,
    )
    embedder = Backend(
        "embedder",
        config.embedder_addresses,
        config.retry_attempts,
        client_interceptors,
        tracing,
        tls_files=tls.files_of(config),
        policy_factory=functools.partial(routing.make_policy, config),
        model_refresh_s=config.model_refresh_seconds,
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
    draining = Draining()
    if provider is not None:
        interceptors.append(common_telemetry.tracing_interceptor(provider.get_tracer("services.gateway")))
    interceptors.append(
        serving_interceptor(
            GatewayRequests(stats),
            MAPPING,
            policies=[draining, Authentication(store, jwt), RateLimiting(limiter)],
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
    info_pb2_grpc.add_InfoServiceServicer_to_server(
        InfoServicer(backends, catalog, stats, address, lambda: draining.draining), server
    )
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
    return Gateway(server, backends, port, limiter, health_servicer, draining)


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
    log.info(
        "shutting down: NOT_SERVING, no new calls, up to %.0f s for %d in flight",
        config.shutdown_grace_s,
        gateway.draining.in_flight,
    )
    if not await gateway.drain(config.shutdown_grace_s):
        log.warning(
            "grace period over with %d calls still running; they are cut off", gateway.draining.in_flight
        )
    await gateway.stop(1.0)
    log.info("stopped")
