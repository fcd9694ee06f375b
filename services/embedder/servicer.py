"""gRPC servicers: protobuf in, an engine call, protobuf out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from inference.v1 import embedding_pb2, embedding_pb2_grpc, info_pb2, info_pb2_grpc

from services.common.load_reports import load_reports
from services.common.machine import device_info, memory_info
from services.embedder.engine import EmbeddingEngine, EmbedParams, as_lists
from services.embedder.exceptions import InvalidInput

Context = grpc.aio.ServicerContext[Any, Any]


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: Context
    ) -> embedding_pb2.EmbedResponse:
        encoding = request.encoding_format
        if encoding not in (
            embedding_pb2.ENCODING_FORMAT_UNSPECIFIED,
            embedding_pb2.ENCODING_FORMAT_FLOAT,
            embedding_pb2.ENCODING_FORMAT_BASE64,
        ):
            raise InvalidInput(
                "encoding_format", f"must be ENCODING_FORMAT_FLOAT or ENCODING_FORMAT_BASE64, got {encoding}"
            )
        params = EmbedParams(
            input=json_format.MessageToDict(request.input) if request.HasField("input") else None,
            model=request.model,
            normalize=request.normalize if request.HasField("normalize") else True,
            dimensions=request.dimensions if request.HasField("dimensions") else None,
            truncate=request.truncate if request.HasField("truncate") else False,
        )
        result = await self.engine.embed(params)
        reply = embedding_pb2.EmbedResponse(model=result.model, dimensions=int(result.vectors.shape[1]))
        reply.usage.prompt_tokens = result.prompt_tokens
        reply.usage.total_tokens = result.prompt_tokens
        if encoding == embedding_pb2.ENCODING_FORMAT_BASE64:
            little = result.vectors.astype("<f4", copy=False)
            reply.data.extend(
                embedding_pb2.Embedding(index=index, embedding_bytes=row.tobytes())
                for index, row in enumerate(little)
            )
        else:
            reply.data.extend(
                embedding_pb2.Embedding(index=index, embedding=row)
                for index, row in enumerate(as_lists(result.vectors))
            )
        return reply

    async def PreloadModels(
        self, request: embedding_pb2.PreloadModelsRequest, context: Context
    ) -> embedding_pb2.PreloadModelsResponse:
        if not request.models:
            raise InvalidInput("models", "must name at least one model")
        return embedding_pb2.PreloadModelsResponse(accepted=self.engine.cache.preload(request.models))

    async def GetCacheStatus(
        self, request: embedding_pb2.GetCacheStatusRequest, context: Context
    ) -> embedding_pb2.GetCacheStatusResponse:
        status = self.engine.cache.status()
        return embedding_pb2.GetCacheStatusResponse(
            strategy=status.strategy,
            max_models=status.max_models,
            memory_budget_mib=status.memory_budget_mib,
            memory_used_mib=status.memory_used_mib,
            models=[
                embedding_pb2.CachedModel(
                    name=model.name,
                    size_mib=model.size_mib,
                    device=model.device,
                    dimensions=model.dimensions,
                    max_seq_length=model.max_seq_length,
                    hits=model.hits,
                    loaded_at=model.loaded_at,
                    last_used_at=model.last_used_at,
                )
                for model in status.models
            ],
            loading=status.loading,
            evictions=status.evictions,
        )

    async def ClearCache(
        self, request: embedding_pb2.ClearCacheRequest, context: Context
    ) -> embedding_pb2.ClearCacheResponse:
        return embedding_pb2.ClearCacheResponse(cleared=self.engine.cache.clear(request.models))

    async def GetModelCounter(
        self, request: embedding_pb2.GetModelCounterRequest, context: Context
    ) -> embedding_pb2.GetModelCounterResponse:
        name, counter = self.engine.counter(request.model)
        return embedding_pb2.GetModelCounterResponse(
            model=name,
            requests=counter.requests,
            inputs=counter.inputs,
            tokens=counter.tokens,
            errors=counter.errors,
        )


class InfoServicer(info_pb2_grpc.InfoServiceServicer):
    def __init__(self, engine: EmbeddingEngine, address: str) -> None:
        self.engine = engine
        self.address = address

    async def GetHealth(
        self, request: info_pb2.GetHealthRequest, context: Context
    ) -> info_pb2.GetHealthResponse:
        engine = self.engine
        serving = engine.ready and not engine.draining
        status = info_pb2.SERVING_STATUS_SERVING if serving else info_pb2.SERVING_STATUS_NOT_SERVING
        message = ""
        if engine.draining:
            message = "shutting down"
        elif not engine.ready:
            message = f"loading {engine.default_name}"
        component = info_pb2.ComponentHealth(
            component="embedder",
            address=self.address,
            status=status,
            device=device_info(engine.device),
            memory=memory_info(engine.device),
            models=[model.name for model in engine.cache.entries()],
            uptime_seconds=time.time() - engine.started_at,
            message=message,
        )
        return info_pb2.GetHealthResponse(status=status, components=[component])

    async def GetStats(
        self, request: info_pb2.GetStatsRequest, context: Context
    ) -> info_pb2.GetStatsResponse:
        stats = self.engine.stats()
        component = info_pb2.ComponentStats(
            component="embedder",
            address=self.address,
            uptime_seconds=stats.uptime_seconds,
            requests_total=stats.requests_total,
            requests_failed=stats.requests_failed,
            requests_running=stats.requests_running,
            requests_waiting=stats.inputs_waiting,
            prompt_tokens_total=stats.prompt_tokens_total,
            embedded_inputs_total=stats.embedded_inputs_total,
            mean_batch_size=stats.mean_batch_size,
            cache_hits=stats.cache_hits,
        )
        return info_pb2.GetStatsResponse(components=[component])

    async def ListServedModels(
        self, request: info_pb2.ListServedModelsRequest, context: Context
    ) -> info_pb2.ListServedModelsResponse:
        engine = self.engine
        reply = info_pb2.ListServedModelsResponse()
        loaded = {model.name: model for model in engine.cache.entries()}
        if engine.default_name not in loaded:
            spec = engine.cache.resolve(engine.default_name)
            reply.models.add(
                id=spec.name,
                task="embedding",
                source=spec.source,
                dtype=spec.dtype,
                device=spec.device,
                loaded=False,
            )
        for model in loaded.values():
            reply.models.add(
                id=model.name,
                task="embedding",
                source=model.spec.source,
                dtype=model.served_dtype,
                device=model.device,
                max_sequence_length=model.max_seq_length,
                dimensions=model.dimensions,
                loaded=True,
            )
        return reply

    def _load(self) -> info_pb2.WatchLoadResponse:
        batcher = self.engine.batcher
        return info_pb2.WatchLoadResponse(
            running=batcher.running_inputs,
            waiting=batcher.queued_inputs,
            capacity=batcher.max_batch_size,
            models=sorted(model.name for model in self.engine.cache.entries()),
        )

    async def WatchLoad(
        self, request: info_pb2.WatchLoadRequest, context: Context
    ) -> AsyncIterator[info_pb2.WatchLoadResponse]:
        """This replica's load in inputs, at once and on every change; ends when the embedder drains."""
        async for report in load_reports(request, self._load, lambda: self.engine.draining):
            yield report
