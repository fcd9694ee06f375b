"""The crash test: two predictions replicas on one PostgreSQL database, 50 predictions in flight,
`kill -9` of one replica half-way. Every prediction still ends `succeeded`, its `completed`
webhook arrives (one webhook-id per prediction, whatever the retries), and the generator served
no more requests than the 50 plus the runs the dead replica had started: nothing ran twice at
once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import json_format
from inference.v1 import info_pb2, info_pb2_grpc, predictions_pb2, predictions_pb2_grpc

from services.predictions.records import Prediction
from services.predictions.store import open_store
from tests.fixtures_gateway import GatewayService
from tests.fixtures_generator import GeneratorService
from tests.fixtures_postgres import PostgresServer
from tests.fixtures_predictions import PredictionsService, start_predictions
from tests.stack import metric_samples
from tests.webhook_receiver import Received, webhook_receiver

COUNT = 50
LEASE_SECONDS = "3"
# Short leases and polls: the survivor takes the dead replica's work over within seconds.
REPLICA_FLAGS = (
    "--lease-seconds",
    LEASE_SECONDS,
    "--poll-seconds",
    "0.2",
    "--webhook-retry-seconds",
    "120",
    "--webhook-max-backoff-seconds",
    "1",
)


def generator_requests(generator: GeneratorService) -> int:
    """Generation requests the generator admitted: every one received (GetStats' requests_total)
    less those refused before admission (generator_requests_rejected_total, by reason)."""
    with grpc.insecure_channel(generator.address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    samples = metric_samples(generator.metrics_port)
    rejected = sum(value for name, _, value in samples if name == "generator_requests_rejected_total")
    return int(reply.components[0].requests_total) - int(rejected)


def served_model(gateway_service: GatewayService) -> str:
    with grpc.insecure_channel(gateway_service.address) as channel:
        served = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
            info_pb2.ListServedModelsRequest(), metadata=gateway_service.metadata("user"), timeout=30
        )
    return next(m.id for m in served.models if m.task == "generation")


async def stored(database_url: str, ids: list[str]) -> list[Prediction]:
    """The rows as the store keeps them (attempt counts are not part of the API)."""
    store = await open_store(database_url, lambda prediction: "{}")
    try:
        found = [await store.get(prediction_id) for prediction_id in ids]
    finally:
        await store.close()
    return [p for p in found if p is not None]


@pytest.fixture
def replicas(
    gateway_service: GatewayService, postgres_server: PostgresServer
) -> Iterator[tuple[PredictionsService, PredictionsService]]:
    database = postgres_server.create_database("crash")
    first = start_predictions(gateway_service, database, "predictions-a", args=REPLICA_FLAGS)
    try:
        second = start_predictions(gateway_service, database, "predictions-b", args=REPLICA_FLAGS)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop(grace=5)
    second.stop()


def test_kill_9_of_one_replica_loses_nothing_and_runs_nothing_twice(
    replicas: tuple[PredictionsService, PredictionsService],
    gateway_service: GatewayService,
    generator_service: GeneratorService,
) -> None:
    victim, survivor = replicas
    metadata = gateway_service.metadata("user")
    admin = gateway_service.metadata("admin")
    model = served_model(gateway_service)
    with grpc.insecure_channel(survivor.address) as channel:
        secret = (
            predictions_pb2_grpc.PredictionServiceStub(channel)
            .GetWebhookSecret(predictions_pb2.GetWebhookSecretRequest(), metadata=admin, timeout=30)
            .key
        )
    before = generator_requests(generator_service)
    with (
        webhook_receiver(secret) as receiver,
        grpc.insecure_channel(victim.address) as victim_channel,
        grpc.insecure_channel(survivor.address) as survivor_channel,
    ):
        stubs = [
            predictions_pb2_grpc.PredictionServiceStub(victim_channel),
            predictions_pb2_grpc.PredictionServiceStub(survivor_channel),
        ]

        def create(index: int) -> str:
            request = predictions_pb2.CreatePredictionRequest(
                model=model, webhook=receiver.url, webhook_events_filter=["completed"]
            )
            json_format.ParseDict(
                {
                    "prompt": f"Story number {index}: once upon a time",
                    "parameters": {"max_new_tokens": 24, "do_sample": False},
                },
                request.input,
            )
            # Both replicas accept work: whichever claims it runs it.
            return str(stubs[index % 2].CreatePrediction(request, metadata=metadata, timeout=30).id)

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(create, range(COUNT)))
        assert len(set(ids)) == COUNT

        survivor_stub = stubs[1]

        def statuses() -> dict[str, str]:
            return {
                prediction_id: survivor_stub.GetPrediction(
                    predictions_pb2.GetPredictionRequest(id=prediction_id), metadata=metadata, timeout=30
                ).status
                for prediction_id in ids
            }

        # Half-way: some done, some running (on both replicas, as each claims what it can).
        deadline = time.monotonic() + 120
        while True:
            now = statuses()
            done = sum(status == "succeeded" for status in now.values())
            if done >= COUNT // 5 and "processing" in now.values():
                break
            assert done < COUNT, "everything ended before the kill: make the runs longer"
            assert time.monotonic() < deadline, now
            time.sleep(0.1)
        victim.process.send_signal(signal.SIGKILL)
        assert victim.process.process is not None
        assert victim.process.process.wait(timeout=10) == -signal.SIGKILL

        deadline = time.monotonic() + 180
        now = statuses()
        while set(now.values()) - {"succeeded", "failed", "canceled"}:
            assert time.monotonic() < deadline, {k: v for k, v in now.items() if v != "succeeded"}
            time.sleep(0.5)
            now = statuses()
        assert set(now.values()) == {"succeeded"}, now

        def every_completed_arrived(received: list[Received]) -> bool:
            return {r.prediction["id"] for r in received if r.answered == 200} >= set(ids)

        received = receiver.wait_for(every_completed_arrived, timeout=120)
    after = generator_requests(generator_service)

    rows = asyncio.run(stored(survivor.database_url, ids))
    assert len(rows) == COUNT
    attempts = {row.id: row.attempt for row in rows}
    assert all(1 <= attempt <= 2 for attempt in attempts.values()), attempts
    interrupted = sum(attempt - 1 for attempt in attempts.values())
    assert interrupted >= 1, "the killed replica was running nothing"

    mine = [r for r in received if r.prediction["id"] in attempts]
    assert all(r.problem is None for r in mine), [r.problem for r in mine if r.problem]
    assert all(r.event == "completed" and r.prediction["status"] == "succeeded" for r in mine)
    # One completed event per prediction: a redelivery (the victim sent it, then died before
    # recording it) reuses the webhook-id, so a receiver deduplicates on it.
    ids_per_prediction: dict[str, set[str]] = {}
    for r in mine:
        ids_per_prediction.setdefault(r.prediction["id"], set()).add(r.webhook_id)
    assert {k: len(v) for k, v in ids_per_prediction.items()} == dict.fromkeys(ids, 1)
    assert len({r.webhook_id for r in mine}) == COUNT

    # Each run reaches the generator at most once: the 50, plus the interrupted runs that had
    # reached it before the kill.
    served = after - before
    redelivered = len(mine) - COUNT
    print(
        f"generator requests {served}, interrupted runs {interrupted}, completed redeliveries {redelivered}"
    )
    assert COUNT <= served <= COUNT + interrupted, (served, interrupted)
