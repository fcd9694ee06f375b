"""Builds and runs the predictions service: the store, the runner, the webhook sender and the
grpc.aio server in front of them."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from inference.v1 import predictions_pb2, predictions_pb2_grpc
from prometheus_client import start_http_server

from services.common import keepalive, tls
from services.common.auth import Authentication, KeyStore, jwt_settings
from services.common.interceptors import serving_interceptor
from services.predictions import convert, webhooks
from services.predictions.config import PredictionsConfig
from services.predictions.errors import ERROR_DOMAIN, MAPPING
from services.predictions.metrics import PredictionRequests
from services.predictions.notify import Changes
from services.predictions.records import Store
from services.predictions.runner import Runner, RunnerSettings
from services.predictions.servicer import METHOD_SCOPES, GatewayModels, PredictionServicer
from services.predictions.store import open_store
from services.predictions.webhooks import WebhookSender, WebhookSettings

log = logging.getLogger("services.predictions")

SERVICE_NAME = predictions_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MAX_MESSAGE_BYTES = 16 << 20


@dataclass
class PredictionsServer:
    server: grpc.aio.Server
    port: int
    store: Store
    runner: Runner
    sender: WebhookSender
    gateway: tls.ReloadingChannel
    health: health.aio.HealthServicer

    async def stop(self, grace: float = 5.0) -> None:
        """Stops accepting calls, lets running predictions end (or hands them back), then closes."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.runner.stop(grace)
        await self.sender.stop()
        await self.gateway.close()
        await self.store.close()


def runner_settings(config: PredictionsConfig) -> RunnerSettings:
    """The runner's settings, all from the config."""
    return RunnerSettings(
        concurrency=config.concurrency,
        lease_seconds=config.lease_seconds,
        poll_seconds=config.poll_seconds,
        max_attempts=config.max_attempts,
        progress_seconds=config.progress_seconds,
        max_output_bytes=config.max_output_bytes,
        retention_seconds=config.retention_seconds,
        purge_seconds=config.purge_seconds,
        predict_timeout_seconds=config.predict_timeout_seconds,
        jwt_claims_header=config.jwt_claims_header,
    )


def webhook_settings(config: PredictionsConfig) -> WebhookSettings:
    """The webhook sender's settings, all from the config."""
    return WebhookSettings(
        retry_seconds=config.webhook_retry_seconds,
        max_backoff_seconds=config.webhook_max_backoff_seconds,
        timeout_seconds=config.webhook_timeout_seconds,
        poll_seconds=config.poll_seconds,
        concurrency=config.concurrency,
        allow_private=config.allow_private_webhooks,
    )


async def build(config: PredictionsConfig) -> PredictionsServer:
    """Opens the store (migrating it), starts the runner and the webhook sender, and returns the
    server bound to its port (not yet started) with health SERVING."""
    keys = KeyStore(config.api_keys_file, config.api_keys)
    jwt = jwt_settings(config.jwt_claims_header, config.jwt_scope_claim, config.jwt_scope_map)
    if keys.open and jwt is None:
        log.warning("no API keys configured: the predictions service is OPEN (set --api-keys-file)")
    store = await open_store(
        config.database_url,
        functools.partial(convert.prediction_json, public_url=config.public_url),
        pool_size=config.pool_size,
    )
    secret = config.webhook_secret or await store.setting("webhook_secret", webhooks.new_secret)
    worker = config.worker
    changes = Changes()
    runner = Runner(
        store, config.gateway_address, runner_settings(config), changes, worker, tls.files_of(config)
    )
    sender = WebhookSender(store, secret, worker, webhook_settings(config))
    # Events this replica queues (the runner's, the servicer's cancels) go out at once.
    store.on_events(sender.wake)
    gateway = tls.ReloadingChannel.to(
        config.gateway_address, tls.files_of(config), "predictions -> gateway", keepalive.client_options()
    )
    server = grpc.aio.server(
        interceptors=[
            serving_interceptor(
                PredictionRequests(),
                MAPPING,
                policies=[Authentication(keys, METHOD_SCOPES, ERROR_DOMAIN, jwt)],
            )
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *keepalive.server_options(),
        ],
    )
    predictions_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(
            store,
            runner,
            changes,
            GatewayModels(gateway.current),
            webhooks.webhook_url_problem,
            public_url=config.public_url,
            webhook_secret=secret,
            allow_private_webhooks=config.allow_private_webhooks,
            max_input_bytes=config.max_input_bytes,
            max_wait_seconds=config.max_wait_seconds,
            max_waiting_per_key=config.max_waiting_per_key,
            max_waiting_total=config.max_waiting_total,
            poll_seconds=config.poll_seconds,
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    port = tls.add_port(server, address, tls.files_of(config))
    if port == 0:
        await store.close()
        raise RuntimeError(f"cannot listen on {address}")
    await runner.start()
    await sender.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return PredictionsServer(server, port, store, runner, sender, gateway, health_servicer)


async def serve(config: PredictionsConfig) -> None:
    service = await build(config)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    await service.server.start()
    log.info(
        "predictions on %s:%d (metrics :%d); gateway %s, worker %s",
        config.host,
        service.port,
        config.metrics_port,
        config.gateway_address,
        config.worker,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await service.stop()
