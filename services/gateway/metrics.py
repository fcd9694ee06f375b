"""Prometheus metrics of the gateway: requests by method, key and status, latency and in-flight
calls (recorded by the common request-metrics interceptor), plus counters the cache and rate
limiter bump."""

from __future__ import annotations

import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.gateway.auth import current_key

REQUESTS = Counter(
    "gateway_requests_total",
    "Calls handled, by method, API key name and gRPC status.",
    ["method", "key", "code"],
)
LATENCY = Histogram(
    "gateway_request_duration_seconds",
    "Time from call start to its last message, by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Calls being handled, by method.", ["method"])
RATE_LIMITED = Counter(
    "gateway_rate_limit_rejections_total", "Calls refused by a rate limit, by key.", ["key"]
)
CACHE_HITS = Counter("gateway_cache_hits_total", "Response cache hits, by backend method.", ["method"])
CACHE_MISSES = Counter("gateway_cache_misses_total", "Response cache misses of cacheable calls.", ["method"])
BACKEND_ERRORS = Counter(
    "gateway_backend_errors_total", "Failed backend calls, by backend method and status.", ["method", "code"]
)
TOKENS = Counter("gateway_tokens_total", "Tokens reported by backends, by key.", ["key"])


class GatewayStats:
    """Totals the gateway reports on its own InfoService."""

    def __init__(self) -> None:
        self.started = time.time()
        self.total = 0
        self.failed = 0
        self.running = 0
        self.cache_hits = 0


class GatewayRequests:
    """The gateway's request metrics (a RequestObserver): by full method, API key and status."""

    def __init__(self, stats: GatewayStats) -> None:
        self._stats = stats

    def started(self, method: str) -> None:
        self._stats.total += 1
        self._stats.running += 1
        IN_FLIGHT.labels(method).inc()

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._stats.running -= 1
        IN_FLIGHT.labels(method).dec()
        if code != grpc.StatusCode.OK:
            self._stats.failed += 1
        REQUESTS.labels(method, current_key.get().name, code.name).inc()
        LATENCY.labels(method).observe(seconds)


# The shared rate-limit store (services/gateway/ratelimit_redis.py).
RATE_LIMIT_STORE_UP = Gauge(
    "gateway_rate_limit_store_up",
    "1 while the shared rate-limit store answers, 0 while the gateway limits on its local buckets.",
    ["store"],
)
RATE_LIMIT_FALLBACKS = Counter(
    "gateway_rate_limit_fallbacks_total",
    "Rate-limit checks and token charges done on the local buckets because the shared store "
    "failed or was down.",
    ["store"],
)
