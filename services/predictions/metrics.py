"""Prometheus metrics of the predictions service: requests by method, key and status, latency
and in-flight calls (recorded by the common request-metrics interceptor), and predictions created."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.auth import current_key

REQUESTS = Counter(
    "predictions_requests_total",
    "Calls handled, by method, API key name and gRPC status.",
    ["method", "key", "code"],
)
LATENCY = Histogram(
    "predictions_request_duration_seconds",
    "Time from call start to its last message, by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("predictions_requests_in_flight", "Calls being handled, by method.", ["method"])
CREATED = Counter("predictions_created_total", "Predictions accepted, by task.", ["task"])
QUEUE_FULL = Counter(
    "predictions_queue_full_total", "Creates refused because too many were waiting, by scope.", ["scope"]
)


class PredictionRequests:
    """The service's request metrics (a RequestObserver): by full method, API key and status."""

    def started(self, method: str) -> None:
        IN_FLIGHT.labels(method).inc()

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        IN_FLIGHT.labels(method).dec()
        REQUESTS.labels(method, current_key.get().name, code.name).inc()
        LATENCY.labels(method).observe(seconds)
