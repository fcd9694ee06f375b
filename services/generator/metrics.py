"""The generator's Prometheus metrics, served on their own port."""

from __future__ import annotations

from dataclasses import dataclass, field

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
REJECTED = Counter(
    "generator_requests_rejected",
    "Generation requests refused before admission, by reason (the status code, lower case)",
    ["reason"],
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


GENERATION_PREFIX = "/inference.v1.GenerationService/"
# Codes a request ends with when it was refused before it reached the batch: invalid, over
# capacity (waiting queue or token budget), shutting down or loading, unknown model.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


@dataclass
class RequestTally:
    """Generation requests as the servicer received them: each one once in `received`, those
    refused before admission in `rejected` by reason. Failures of admitted requests are the
    engine's (`SchedulerStats.requests_failed`)."""

    received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class GeneratorRequests:
    """The generator's request metrics (a RequestObserver): every call by RPC and outcome, and
    the generation calls in `tally` (received, and refused before admission by reason)."""

    def __init__(self, tally: RequestTally) -> None:
        self.tally = tally

    def started(self, method: str) -> None:
        if method.startswith(GENERATION_PREFIX):
            self.tally.received += 1

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        rpc = rpc_name(method)
        REQUESTS.labels(rpc, code.name.lower()).inc()
        REQUEST_SECONDS.labels(rpc).observe(seconds)
        if method.startswith(GENERATION_PREFIX) and code in REFUSALS:
            reason = code.name.lower()
            self.tally.rejected[reason] = self.tally.rejected.get(reason, 0) + 1
            REJECTED.labels(reason).inc()
