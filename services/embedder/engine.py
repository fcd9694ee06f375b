"""The embedding engine: validation, tokenization, the model cache and the batcher, no gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.embedder import metrics
from services.embedder.batcher import (
    CPU_FORWARD_OVERHEAD_TOKENS,
    GPU_FORWARD_OVERHEAD_TOKENS,
    BatchReport,
    DynamicBatcher,
)
from services.embedder.cache import CacheEvents, CacheSettings, ModelCache
from services.embedder.config import EmbedderConfig
from services.embedder.exceptions import EmbedderError, InvalidInput, Overloaded, ShuttingDown
from services.embedder.inputs import ParsedInput, parse_input
from services.embedder.models import EmbeddingModel, packaged_default_model, resolve_device
from services.embedder.precision import PROBE_TEXTS, choose_precision, cpu_traits
from services.embedder.spec import ModelSpec

log = logging.getLogger(__name__)

# Tokenizing this many characters on the event loop would stall other requests; larger inputs
# go to a thread (fast tokenizers release the GIL).
INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class EmbedParams:
    input: Any
    model: str = ""
    normalize: bool = True
    dimensions: int | None = None
    truncate: bool = False


@dataclass(frozen=True)
class EmbedResult:
    model: str
    vectors: npt.NDArray[np.float32]
    prompt_tokens: int


@dataclass
class ModelCounter:
    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    errors: int = 0


@dataclass(frozen=True)
class EngineStats:
    uptime_seconds: float
    requests_total: int
    requests_failed: int
    requests_running: int
    inputs_waiting: int
    prompt_tokens_total: int
    embedded_inputs_total: int
    mean_batch_size: float
    cache_hits: int


class EmbeddingEngine:
    def __init__(self, config: EmbedderConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        default_source = config.default_model or packaged_default_model()
        self.precision = choose_precision(
            config.precision, self.device, config.backend, config.dtype, cpu_traits()
        )
        settings = CacheSettings(
            strategy=config.cache_strategy,
            max_models=config.max_models,
            memory_budget_mib=config.memory_budget_mib,
            safety_margin_mib=config.memory_safety_margin_mib,
            default_name=config.default_model_name,
            default_source=default_source,
            allowed=config.allowed_models,
            device=self.device,
            dtype=config.dtype,
            backend=config.backend,
            onnx_dir=config.onnx_dir,
            precision=self.precision.precision,
            verify_precision=self.precision.verify,
        )
        self.cache = ModelCache(
            settings,
            loader=self._load_model,
            events=CacheEvents(
                on_hit=lambda name: metrics.CACHE_HITS.labels(name).inc(),
                on_miss=lambda name: metrics.CACHE_MISSES.labels(name).inc(),
                on_evict=lambda name: metrics.CACHE_EVICTIONS.labels(name).inc(),
                on_change=self._cache_changed,
            ),
        )
        self.batcher = DynamicBatcher(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000.0,
            on_batch=self._batch_done,
            forward_overhead_tokens=(
                CPU_FORWARD_OVERHEAD_TOKENS if self.device == "cpu" else GPU_FORWARD_OVERHEAD_TOKENS
            ),
        )
        self.counters: dict[str, ModelCounter] = {}
        self.started_at = time.time()
        self.ready = False
        self.draining = False
        self._pending_inputs = 0
        self._running_requests = 0
        self._requests_total = 0
        self._requests_failed = 0
        self._prompt_tokens_total = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def default_name(self) -> str:
        return self.config.default_model_name

    async def start(self) -> None:
        """Load and warm up the default model, then start batching and the configured preloads."""
        self.batcher.start()
        model = await self.cache.get(self.default_name)
        self._log_precision(model)
        await self.batcher.submit(
            model, model.tokenize(["warm up the model", "a second, longer warm-up input"])
        )
        self.ready = True
        if self.config.preload_models:
            self.cache.preload(self.config.preload_models)

    def _load_model(self, spec: ModelSpec) -> EmbeddingModel:
        """Load in the calling thread; the bf16 probe's forward passes run on the batcher's model thread."""
        return EmbeddingModel.load(spec, run=self.batcher.run_on_model_thread)

    def _log_precision(self, model: EmbeddingModel) -> None:
        choice = self.precision
        if model.probe_failure is not None:
            log.warning(
                "precision %s, not %s (%s): %s",
                model.precision,
                choice.precision,
                choice.reason,
                model.probe_failure,
            )
            return
        if model.probe_cosine is None:
            log.info("precision %s: %s", model.precision, choice.reason)
            return
        measured = f"cosine to fp32 {model.probe_cosine:.5f} measured (least of {len(PROBE_TEXTS)} probes)"
        if model.precision == choice.precision:
            log.info("precision %s: %s; %s", model.precision, choice.reason, measured)
        else:
            log.warning(
                "precision %s, not %s (%s): %s", model.precision, choice.precision, choice.reason, measured
            )

    async def drain(self, grace_s: float) -> None:
        """Refuse new work and wait up to `grace_s` for running requests."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("%d requests still running after %.0fs", self._running_requests, grace_s)

    async def stop(self) -> None:
        await self.batcher.stop()

    # -- embeddings --------------------------------------------------------------------------

    async def embed(self, params: EmbedParams) -> EmbedResult:
        if self.draining:
            raise ShuttingDown("the embedder is shutting down")
        self._requests_total += 1
        try:
            parsed = parse_input(
                params.input, self.config.max_inputs_per_request, self.config.max_input_chars
            )
            if params.dimensions is not None and params.dimensions < 1:
                raise InvalidInput("dimensions", f"must be at least 1, got {params.dimensions}")
            self._admit(len(parsed))
        except EmbedderError:
            self._requests_failed += 1
            raise
        self._running_requests += 1
        self._idle.clear()
        counter: ModelCounter | None = None
        try:
            model = await self.cache.get(params.model)
            counter = self.counters.setdefault(model.name, ModelCounter())
            counter.requests += 1
            sequences = await self._sequences(model, parsed, params.truncate)
            if params.dimensions is not None and params.dimensions > model.dimensions:
                raise InvalidInput(
                    "dimensions", f"must be at most {model.dimensions}, the size of {model.name}'s vectors"
                )
            raw = await self.batcher.submit(model, sequences)
            vectors = finish_vectors(raw, params.dimensions, params.normalize)
            tokens = sum(len(ids) for ids in sequences)
            counter.inputs += len(sequences)
            counter.tokens += tokens
            self._prompt_tokens_total += tokens
            metrics.INPUTS.labels(model.name).inc(len(sequences))
            metrics.TOKENS.labels(model.name).inc(tokens)
            return EmbedResult(model=model.name, vectors=vectors, prompt_tokens=tokens)
        except BaseException:
            self._requests_failed += 1
            if counter is not None:
                counter.errors += 1
            raise
        finally:
            self._pending_inputs -= len(parsed)
            self._running_requests -= 1
            metrics.PENDING_INPUTS.set(self._pending_inputs)
            if self._running_requests == 0:
                self._idle.set()

    def _admit(self, count: int) -> None:
        limit = self.config.max_pending_inputs
        if self._pending_inputs + count > limit:
            metrics.REJECTED.inc()
            # About how long the work already admitted takes to run.
            expected = self._pending_inputs * self.batcher.seconds_per_input
            raise Overloaded(
                f"{self._pending_inputs} inputs are queued or running; the limit is {limit} "
                "(max_pending_inputs)",
                retry_after_s=max(0.05, min(10.0, expected)),
            )
        self._pending_inputs += count
        metrics.PENDING_INPUTS.set(self._pending_inputs)

    async def _sequences(self, model: EmbeddingModel, parsed: ParsedInput, truncate: bool) -> list[list[int]]:
        if parsed.texts is not None:
            texts = parsed.texts
            if sum(len(text) for text in texts) > INLINE_TOKENIZE_CHARS:
                raw = await asyncio.to_thread(model.tokenize, texts)
            else:
                raw = model.tokenize(texts)
        else:
            assert parsed.token_ids is not None
            raw = [
                model.with_special_tokens(ids, field)
                for ids, field in zip(parsed.token_ids, parsed.fields, strict=True)
            ]
        return [model.fit(ids, truncate, field) for ids, field in zip(raw, parsed.fields, strict=True)]

    # -- cache and info ----------------------------------------------------------------------

    def counter(self, name: str) -> tuple[str, ModelCounter]:
        key = self.cache.resolve(name).name
        return key, self.counters.get(key, ModelCounter())

    def stats(self) -> EngineStats:
        batches = self.batcher.batches
        return EngineStats(
            uptime_seconds=time.time() - self.started_at,
            requests_total=self._requests_total,
            requests_failed=self._requests_failed,
            requests_running=self._running_requests,
            inputs_waiting=self.batcher.queued_inputs,
            prompt_tokens_total=self._prompt_tokens_total,
            embedded_inputs_total=self.batcher.batched_inputs,
            mean_batch_size=self.batcher.batched_inputs / batches if batches else 0.0,
            cache_hits=self.cache.hits,
        )

    def _cache_changed(self, count: int, used_mib: float) -> None:
        metrics.LOADED_MODELS.set(count)
        metrics.CACHE_MEMORY.set(used_mib)

    def _batch_done(self, report: BatchReport) -> None:
        metrics.BATCH_SIZE.observe(report.size)
        metrics.BATCH_TOKENS.observe(report.padded_tokens)
        metrics.INFERENCE_SECONDS.observe(report.inference_seconds)
        for waited in report.queue_seconds:
            metrics.QUEUE_SECONDS.observe(waited)


def finish_vectors(
    raw: npt.NDArray[np.float32], dimensions: int | None, normalize: bool
) -> npt.NDArray[np.float32]:
    """Keep the first `dimensions` values, then scale to unit length when asked."""
    vectors = raw[:, :dimensions] if dimensions is not None else raw
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def as_lists(vectors: npt.NDArray[np.float32]) -> Sequence[list[float]]:
    result: list[list[float]] = vectors.tolist()
    return result
