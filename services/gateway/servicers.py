"""The gateway's servicers: thin translations between the public contract and the backend calls.
Auth, limits, metrics, traces and error mapping wrap them as interceptors (server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf.message import Message
from inference.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    openai_pb2,
    openai_pb2_grpc,
)

from services.common import sse
from services.common.interceptors import Context
from services.common.load_reports import load_reports
from services.common.machine import device_info, memory_info
from services.gateway import openai_compat as oai
from services.gateway import validation
from services.gateway.backends import Backend, Backends
from services.gateway.catalog import ModelCatalog
from services.gateway.errors import MAPPING, GatewayError, from_backend, http_like, not_found, renamed
from services.gateway.metrics import GatewayStats

T = TypeVar("T")
RequestT = TypeVar("RequestT", bound=Message)


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """`stream`, closed on leaving (an async generator's `aclose`): a nested stream the client
    left ends then, with its backend call, not when the garbage collector finds it."""
    try:
        yield stream
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


def _copy(request: RequestT) -> RequestT:
    duplicate = type(request)()
    duplicate.CopyFrom(request)
    return duplicate


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, backends: Backends, catalog: ModelCatalog, limits: validation.RequestLimits) -> None:
        self._backends = backends
        self._catalog = catalog
        self._limits = limits

    async def _prepared(self, request: RequestT) -> RequestT:
        forwarded = _copy(request)
        if "stream" in forwarded.DESCRIPTOR.fields_by_name:
            forwarded.ClearField("stream")
        model = getattr(forwarded, "model")  # noqa: B009
        setattr(forwarded, "model", await self._catalog.resolve("generation", model))  # noqa: B010
        return forwarded

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> generation_pb2.GenerateResponse:
        validation.validate_generate(request, self._limits)
        return await self._backends.generate(await self._prepared(request), context)

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        validation.validate_generate(request, self._limits)
        # Closed at once when the client leaves, so the replica's call and its count end with it.
        async with _closing(
            self._backends.generate_stream(await self._prepared(request), context)
        ) as messages:
            async for message in messages:
                yield message

    async def GenerateStreamEvents(
        self, request: generation_pb2.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with _closing(
            sse.native_sse(self.GenerateStream(request, context), MAPPING.failure_of)
        ) as events:
            async for event in events:
                yield event

    async def Chat(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> generation_pb2.ChatResponse:
        validation.validate_chat(request, self._limits)
        return await self._backends.chat(await self._prepared(request), context)

    async def ChatStream(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        validation.validate_chat(request, self._limits)
        # Closed at once when the client leaves, so the replica's call and its count end with it.
        async with _closing(self._backends.chat_stream(await self._prepared(request), context)) as messages:
            async for message in messages:
                yield message

    async def ChatStreamEvents(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with _closing(sse.native_sse(self.ChatStream(request, context), MAPPING.failure_of)) as events:
            async for event in events:
                yield event

    async def SolveMath(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> generation_pb2.SolveMathResponse:
        validation.validate_solve(request, self._limits)
        return await self._backends.solve_math(await self._prepared(request), context)

    async def SolveMathStream(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        validation.validate_solve(request, self._limits)
        # Closed at once when the client leaves, so the replica's call and its count end with it.
        async with _closing(
            self._backends.solve_math_stream(await self._prepared(request), context)
        ) as messages:
            async for message in messages:
                yield message

    async def SolveMathStreamEvents(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with _closing(
            sse.native_sse(self.SolveMathStream(request, context), MAPPING.failure_of)
        ) as events:
            async for event in events:
                yield event

    async def SolveCoding(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> generation_pb2.SolveCodingResponse:
        validation.validate_solve(request, self._limits)
        return await self._backends.solve_coding(await self._prepared(request), context)

    async def SolveCodingStream(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        validation.validate_solve(request, self._limits)
        # Closed at once when the client leaves, so the replica's call and its count end with it.
        async with _closing(
            self._backends.solve_coding_stream(await self._prepared(request), context)
        ) as messages:
            async for message in messages:
                yield message

    async def SolveCodingStreamEvents(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with _closing(
            sse.native_sse(self.SolveCodingStream(request, context), MAPPING.failure_of)
        ) as events:
            async for event in events:
                yield event


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, backends: Backends, catalog: ModelCatalog, limits: validation.RequestLimits) -> None:
        self._backends = backends
        self._catalog = catalog
        self._limits = limits

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: Context
    ) -> embedding_pb2.EmbedResponse:
        validation.validate_embed(request, self._limits)
        forwarded = _copy(request)
        forwarded.model = await self._catalog.resolve("embedding", request.model)
        return await self._backends.embed(forwarded, context)

    async def PreloadModels(
        self, request: embedding_pb2.PreloadModelsRequest, context: Context
    ) -> embedding_pb2.PreloadModelsResponse:
        validation.validate_model_names(request.models, "models")
        return await self._backends.preload(request, context)

    async def GetCacheStatus(
        self, request: embedding_pb2.GetCacheStatusRequest, context: Context
    ) -> embedding_pb2.GetCacheStatusResponse:
        return await self._backends.cache_status(request, context)

    async def ClearCache(
        self, request: embedding_pb2.ClearCacheRequest, context: Context
    ) -> embedding_pb2.ClearCacheResponse:
        validation.validate_model_names(request.models, "models")
        return await self._backends.clear_cache(request, context)

    async def GetModelCounter(
        self, request: embedding_pb2.GetModelCounterRequest, context: Context
    ) -> embedding_pb2.GetModelCounterResponse:
        validation.validate_model_names([request.model], "model")
        return await self._backends.model_counter(request, context)


async def _gather_replicas(
    backend: Backend, call: Callable[[info_pb2_grpc.InfoServiceAsyncStub], Awaitable[T]]
) -> list[tuple[str, T | grpc.aio.AioRpcError]]:
    stubs = backend.info_stubs()

    async def one(
        address: str, stub: info_pb2_grpc.InfoServiceAsyncStub
    ) -> tuple[str, T | grpc.aio.AioRpcError]:
        try:
            return address, await call(stub)
        except grpc.aio.AioRpcError as error:
            return address, error

    return list(await asyncio.gather(*(one(address, stub) for address, stub in stubs.items())))


class InfoServicer(info_pb2_grpc.InfoServiceServicer):
    def __init__(
        self,
        backends: Backends,
        catalog: ModelCatalog,
        stats: GatewayStats,
        address: str,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self._backends = backends
        self._catalog = catalog
        self._stats = stats
        self._address = address
        self._draining = draining
        # WatchLoad calls open now: the request metrics count them as running, the load does not.
        self._watchers = 0

    def _running(self) -> int:
        return max(0, self._stats.running - self._watchers)

    def _own_health(self) -> info_pb2.ComponentHealth:
        return info_pb2.ComponentHealth(
            component="gateway",
            address=self._address,
            status=info_pb2.SERVING_STATUS_SERVING,
            device=device_info("cpu"),
            memory=memory_info(),
            uptime_seconds=time.time() - self._stats.started,
        )

    async def GetHealth(
        self, request: info_pb2.GetHealthRequest, context: Context
    ) -> info_pb2.GetHealthResponse:
        reply = info_pb2.GetHealthResponse(components=[self._own_health()])
        serving = True
        for name, backend in (("generator", self._backends.generator), ("embedder", self._backends.embedder)):
            any_serving = False
            for address, result in await _gather_replicas(
                backend, lambda stub: stub.GetHealth(info_pb2.GetHealthRequest(), timeout=3.0)
            ):
                if isinstance(result, grpc.aio.AioRpcError):
                    reply.components.append(
                        info_pb2.ComponentHealth(
                            component=name,
                            address=address,
                            status=info_pb2.SERVING_STATUS_NOT_SERVING,
                            message=f"{result.code().name}: {result.details()}",
                        )
                    )
                    continue
                for component in result.components:
                    part = reply.components.add()
                    part.CopyFrom(component)
                    part.address = part.address or address
                    any_serving = any_serving or component.status == info_pb2.SERVING_STATUS_SERVING
            serving = serving and any_serving
        reply.status = info_pb2.SERVING_STATUS_SERVING if serving else info_pb2.SERVING_STATUS_NOT_SERVING
        return reply

    async def GetStats(
        self, request: info_pb2.GetStatsRequest, context: Context
    ) -> info_pb2.GetStatsResponse:
        own = info_pb2.ComponentStats(
            component="gateway",
            address=self._address,
            uptime_seconds=time.time() - self._stats.started,
            requests_total=self._stats.total,
            requests_failed=self._stats.failed,
            requests_running=self._running(),
            cache_hits=self._backends.cache.hits,
        )
        reply = info_pb2.GetStatsResponse(components=[own])
        for name, backend in (("generator", self._backends.generator), ("embedder", self._backends.embedder)):
            for address, result in await _gather_replicas(
                backend, lambda stub: stub.GetStats(info_pb2.GetStatsRequest(), timeout=3.0)
            ):
                if isinstance(result, grpc.aio.AioRpcError):
                    reply.components.add(component=name, address=address)
                    continue
                for component in result.components:
                    part = reply.components.add()
                    part.CopyFrom(component)
                    part.address = part.address or address
        return reply

    async def ListServedModels(
        self, request: info_pb2.ListServedModelsRequest, context: Context
    ) -> info_pb2.ListServedModelsResponse:
        return info_pb2.ListServedModelsResponse(models=await self._catalog.all_models())

    async def WatchLoad(
        self, request: info_pb2.WatchLoadRequest, context: Context
    ) -> AsyncIterator[info_pb2.WatchLoadResponse]:
        """The gateway's own load (the requests it is running, watches not counted): at once, then on
        a change, at most every `min_interval_ms` (load_reports' default and floor); ends on drain."""
        self._watchers += 1
        try:
            sample = lambda: info_pb2.WatchLoadResponse(running=self._running())  # noqa: E731
            async with _closing(load_reports(request, sample, self._draining)) as reports:
                async for report in reports:
                    yield report
        finally:
            self._watchers -= 1


def _openai_error_event(error: GatewayError) -> bytes:
    kind = "invalid_request_error" if http_like(error.code) < 500 else "server_error"
    return oai.sse_error(error.message, kind, http_like(error.code), error.code.name)


def _sse_stream(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """OpenAI's SSE: chunks ending in [DONE], a failure after the first one in OpenAI's error shape."""
    return sse.sse_stream(chunks, MAPPING.failure_of, _openai_error_event)


@contextlib.contextmanager
def _openai_names(names: dict[str, str]) -> Iterator[None]:
    """A backend's refusal of a native field renamed to the OpenAI field the client sent (the
    generator names `parameters.json_schema` where the client sent `response_format` or `tools`)."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise renamed(from_backend(error), names) from error


class OpenAIServicer(openai_pb2_grpc.OpenAIServiceServicer):
    def __init__(
        self, backends: Backends, catalog: ModelCatalog, limits: validation.RequestLimits, started: float
    ) -> None:
        self._backends = backends
        self._catalog = catalog
        self._limits = limits
        self._created = int(started)

    async def _chat_native(self, request: openai_pb2.CreateChatCompletionRequest) -> tuple[oai.ChatPlan, str]:
        plan = validation.validate_chat_completion(request, self._limits)
        return plan, await self._catalog.resolve("generation", request.model)

    async def CreateChatCompletion(
        self, request: openai_pb2.CreateChatCompletionRequest, context: Context
    ) -> openai_pb2.CreateChatCompletionResponse:
        plan, model = await self._chat_native(request)
        with _openai_names(oai.constraint_source(request, plan.tools)):
            if plan.tools.templated:
                reply = await self._backends.chat(oai.chat_request(request, plan, model), context)
                response = oai.generation_of_chat(reply)
            else:
                native = generation_pb2.GenerateRequest(**oai.chat_fields(request, plan, model))
                response = await self._backends.generate(native, context)
        return oai.chat_response(response, request.model or model, oai.wants_logprobs(request), plan.tools)

    async def StreamChatCompletion(
        self, request: openai_pb2.CreateChatCompletionRequest, context: Context
    ) -> AsyncIterator[openai_pb2.StreamChatCompletionResponse]:
        plan, model = await self._chat_native(request)
        chunker = oai.ChatChunker(
            request.model or model,
            request.stream_options.include_usage,
            oai.wants_logprobs(request),
            plan.tools,
        )
        if plan.tools.templated:
            messages = self._backends.chat_stream(oai.chat_request(request, plan, model), context)
        else:
            native = generation_pb2.GenerateStreamRequest(**oai.chat_fields(request, plan, model))
            messages = self._backends.generate_stream(native, context)
        with _openai_names(oai.constraint_source(request, plan.tools)):
            async with _closing(messages):
                async for message in messages:
                    for chunk in chunker.feed(message):
                        yield chunk
        for chunk in chunker.finish():
            yield chunk

    async def StreamChatCompletionEvents(
        self, request: openai_pb2.CreateChatCompletionRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async def bodies() -> AsyncIterator[dict[str, Any]]:
            async with _closing(self.StreamChatCompletion(request, context)) as chunks:
                async for chunk in chunks:
                    yield oai.chat_chunk_json(chunk)

        async with _closing(_sse_stream(bodies())) as events:
            async for event in events:
                yield event

    async def _completion_native(
        self, request: openai_pb2.CreateCompletionRequest
    ) -> tuple[list[str], list[dict[str, Any]], str]:
        prompts = validation.validate_completion(request, self._limits)
        model = await self._catalog.resolve("generation", request.model)
        return prompts, [oai.completion_fields(request, prompt, model) for prompt in prompts], model

    async def CreateCompletion(
        self, request: openai_pb2.CreateCompletionRequest, context: Context
    ) -> openai_pb2.CreateCompletionResponse:
        prompts, fields, model = await self._completion_native(request)
        with _openai_names(oai.constraint_source(request)):
            responses = await asyncio.gather(
                *(self._backends.generate(generation_pb2.GenerateRequest(**one), context) for one in fields)
            )
        return oai.completion_response(
            list(responses), prompts, request.echo, request.model or model, oai.wants_logprobs(request)
        )

    async def StreamCompletion(
        self, request: openai_pb2.CreateCompletionRequest, context: Context
    ) -> AsyncIterator[openai_pb2.StreamCompletionResponse]:
        prompts, fields, model = await self._completion_native(request)
        chunker = oai.CompletionChunker(
            request.model or model,
            request.stream_options.include_usage,
            request.echo,
            oai.wants_logprobs(request),
        )
        per_prompt = request.n if request.HasField("n") else 1
        for number, (prompt, one) in enumerate(zip(prompts, fields, strict=True)):
            native = generation_pb2.GenerateStreamRequest(**one)
            with _openai_names(oai.constraint_source(request)):
                async with _closing(self._backends.generate_stream(native, context)) as messages:
                    async for message in messages:
                        for chunk in chunker.feed(message, prompt, number * per_prompt):
                            yield chunk
        for chunk in chunker.finish():
            yield chunk

    async def StreamCompletionEvents(
        self, request: openai_pb2.CreateCompletionRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async def bodies() -> AsyncIterator[dict[str, Any]]:
            async with _closing(self.StreamCompletion(request, context)) as chunks:
                async for chunk in chunks:
                    yield oai.completion_chunk_json(chunk)

        async with _closing(_sse_stream(bodies())) as events:
            async for event in events:
                yield event

    async def CreateEmbedding(
        self, request: openai_pb2.CreateEmbeddingRequest, context: Context
    ) -> openai_pb2.CreateEmbeddingResponse:
        validation.validate_openai_embedding(request, self._limits)
        model = await self._catalog.resolve("embedding", request.model)
        response = await self._backends.embed(oai.embedding_request(request, model), context)
        return oai.embedding_response(response, request.encoding_format, request.model)

    def _model(self, model: info_pb2.ServedModel) -> openai_pb2.Model:
        return openai_pb2.Model(
            id=model.id, object="model", created=self._created, owned_by=oai.OWNER, replicas=model.replicas
        )

    async def ListModels(
        self, request: openai_pb2.ListModelsRequest, context: Context
    ) -> openai_pb2.ListModelsResponse:
        models = await self._catalog.all_models()
        return openai_pb2.ListModelsResponse(object="list", data=[self._model(model) for model in models])

    async def RetrieveModel(
        self, request: openai_pb2.RetrieveModelRequest, context: Context
    ) -> openai_pb2.RetrieveModelResponse:
        model = await self._catalog.find(request.model)
        if model is None:
            known = [item.id for item in await self._catalog.all_models()]
            raise not_found("model", request.model, known)
        return openai_pb2.RetrieveModelResponse(
            id=model.id, object="model", created=self._created, owned_by=oai.OWNER
        )
