"""Prometheus metrics of the embedder, served on their own port."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.interceptors import rpc_name

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("embedder_requests_total", "RPCs handled, by method and status code.", ["method", "code"])
REQUEST_SECONDS = Histogram(
    "embedder_request_seconds", "RPC latency, by method.", ["method"], buckets=_SECONDS
)
INPUTS = Counter("embedder_inputs_total", "Inputs embedded, by model.", ["model"])
TOKENS = Counter("embedder_tokens_total", "Tokens embedded (with special tokens), by model.", ["model"])
REJECTED = Counter("embedder_rejected_total", "Requests refused by admission control.")
PENDING_INPUTS = Gauge("embedder_pending_inputs", "Inputs admitted and not yet answered.")
BATCH_SIZE = Histogram("embedder_batch_size", "Inputs per forward pass.", buckets=_SIZES)
BATCH_TOKENS = Histogram("embedder_batch_tokens", "Padded tokens per forward pass.", buckets=_TOKENS)
QUEUE_SECONDS = Histogram("embedder_queue_seconds", "Time an input waits for its batch.", buckets=_SECONDS)
INFERENCE_SECONDS = Histogram("embedder_inference_seconds", "Time of one forward pass.", buckets=_SECONDS)
CACHE_HITS = Counter("embedder_cache_hits_total", "Requests whose model was loaded.", ["model"])
CACHE_MISSES = Counter("embedder_cache_misses_total", "Requests that had to load their model.", ["model"])
CACHE_EVICTIONS = Counter("embedder_cache_evictions_total", "Models evicted from the cache.", ["model"])
LOADED_MODELS = Gauge("embedder_loaded_models", "Models in the cache.")
CACHE_MEMORY = Gauge("embedder_cache_memory_mib", "Estimated memory held by loaded models, in MiB.")


class EmbedderRequests:
    """The embedder's request metrics (a RequestObserver): by method name and status code."""

    def started(self, method: str) -> None:
        pass

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        name = rpc_name(method)
        REQUESTS.labels(name, code.name).inc()
        REQUEST_SECONDS.labels(name).observe(seconds)
