"""Channel settings shared by the sync and asyncio clients: the retry policy (as a gRPC service
config, so grpc-core retries with backoff and never replays a stream that already delivered
messages), API key metadata and message size limits."""

from __future__ import annotations

import json
from dataclasses import dataclass

from inference.v1 import embedding_pb2, generation_pb2, info_pb2, predictions_pb2

# Unary methods only: a stream that fails half way must not be replayed from the start behind the
# caller's back (its tokens were already shown).
UNARY_METHODS: dict[str, tuple[str, ...]] = {
    service.full_name: tuple(method.name for method in service.methods if not method.server_streaming)
    for file in (generation_pb2.DESCRIPTOR, embedding_pb2.DESCRIPTOR, info_pb2.DESCRIPTOR)
    for service in file.services_by_name.values()
}
# Predictions are stored: only reads and cancels (which change nothing twice) are retried, since
# a create the server stored before the connection dropped would otherwise become two jobs.
UNARY_METHODS[predictions_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name] = (
    "GetPrediction",
    "ListPredictions",
    "CancelPrediction",
    "GetDeployment",
    "ListDeployments",
    "GetWebhookSecret",
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Retry of unary calls that fail with UNAVAILABLE (server not reachable yet, or restarting).

    gRPC caps `max_attempts` at 5 and waits a random time up to the current backoff between
    attempts. `max_attempts=1` turns retries off."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def service_config(self) -> str:
        if self.max_attempts <= 1:
            return json.dumps({"methodConfig": []})
        names = [
            {"service": service, "method": method}
            for service, methods in UNARY_METHODS.items()
            for method in methods
        ]
        policy = {
            "maxAttempts": min(self.max_attempts, 5),
            "initialBackoff": f"{self.initial_backoff:.3f}s",
            "maxBackoff": f"{self.max_backoff:.3f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


NO_RETRY = RetryPolicy(max_attempts=1)


def channel_options(retry: RetryPolicy) -> list[tuple[str, str | int]]:
    return [
        ("grpc.service_config", retry.service_config()),
        ("grpc.enable_retries", 1 if retry.max_attempts > 1 else 0),
        # A server that is not up yet is tried again soon, not after gRPC's default 1 s backoff
        # growing to 2 minutes, so that retries can reach it once it listens.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    if not api_key:
        return ()
    return (("authorization", f"Bearer {api_key}"),)
