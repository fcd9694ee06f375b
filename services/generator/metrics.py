"""The generator's Prometheus metrics, served on their own port."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.interceptors import rpc_name

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)

REQUESTS = Counter(
    "generator_requests", "Requests by RPC and outcome (the status code, lower case)", ["rpc", "outcome"]
)
REQUEST_SECONDS = Histogram(
    "generator_request_seconds", "RPC start to its last message, by RPC", ["rpc"], buckets=_LATENCY
)
TTFT = Histogram("generator_time_to_first_token_seconds", "Submission to first token", buckets=_LATENCY)
INTER_TOKEN = Histogram(
    "generator_inter_token_latency_seconds",
    "Time of one decode step, the gap between tokens",
    buckets=_LATENCY,
)
E2E = Histogram("generator_e2e_latency_seconds", "Submission to last token", buckets=_LATENCY)
QUEUE_TIME = Histogram(
    "generator_queue_time_seconds", "Submission to admission into the batch", buckets=_LATENCY
)
PROMPT_TOKENS = Counter("generator_prompt_tokens", "Prompt tokens of admitted requests")
GENERATED_TOKENS = Counter("generator_generated_tokens", "Generated tokens")
RUNNING = Gauge("generator_running_sequences", "Sequences in the running batch")
WAITING = Gauge("generator_waiting_requests", "Requests waiting for a place in the batch")
BATCH_SIZE = Histogram(
    "generator_batch_size", "Rows per decode step", buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128)
)
PROMPT_LENGTH = Histogram("generator_prompt_length_tokens", "Prompt length per request", buckets=_TOKENS)
PREFIX_CACHE_QUERIED_TOKENS = Counter(
    "generator_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"
)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "generator_prefix_cache_hit_tokens", "Prompt tokens whose keys and values came from the prefix cache"
)


class GeneratorRequests:
    """The generator's request metrics (a RequestObserver); `on_failure` counts a failed call in
    the engine's own totals."""

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self._on_failure = on_failure

    def started(self, method: str) -> None:
        pass

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        rpc = rpc_name(method)
        REQUESTS.labels(rpc, code.name.lower()).inc()
        REQUEST_SECONDS.labels(rpc).observe(seconds)
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            self._on_failure()
