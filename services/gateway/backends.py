"""Channels to the backend replicas and the calls the gateway makes on them: round-robin, health-checked,
unary calls retried on UNAVAILABLE; calls carry the client's remaining deadline and filtered metadata, and a
stream is cancelled as soon as the client goes."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from inference.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

from services.common import keepalive, sampling, tls
from services.common.interceptors import Context
from services.common.methods import unary_methods
from services.gateway.metrics import BACKEND_ERRORS, CACHE_HITS, CACHE_MISSES
from services.gateway.ratelimit import charge_tokens

ResponseT = TypeVar("ResponseT", bound=Message)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Only these headers reach the backends; cookies, credentials, Envoy's and the proxies' headers do
# not. Trace headers are re-created by the tracing interceptor when tracing is on.
FORWARDED_HEADERS = frozenset({"x-request-id", "traceparent", "tracestate", "baggage"})
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

# Only unary calls are retried: a stream that already delivered messages is never replayed.
UNARY_METHODS = unary_methods(generation_pb2.DESCRIPTOR, embedding_pb2.DESCRIPTOR, info_pb2.DESCRIPTOR)


def grpc_target(addresses: str) -> tuple[str, list[str]]:
    """The channel target for a comma list of host:port (or a target with a scheme such as
    dns:///name:port), and the replica addresses it names (the target itself when it is a name)."""
    text = addresses.strip()
    if ":///" in text or text.startswith(("ipv4:", "ipv6:", "unix:")):
        return text, [text]
    replicas = [item.strip() for item in text.split(",") if item.strip()]
    if len(replicas) == 1:
        return replicas[0], replicas
    resolved = [_resolve(item) for item in replicas]
    if all(":" not in host for host, _ in resolved):
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in resolved), replicas
    return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in resolved), replicas


def _resolve(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        info = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        return str(info[0][4][0]), port


def service_config(attempts: int) -> str:
    names = [
        {"service": service, "method": method}
        for service, methods in UNARY_METHODS.items()
        for method in methods
    ]
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    if attempts > 1:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": min(attempts, 5),
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def channel_options(attempts: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config(attempts)),
        ("grpc.enable_retries", 1 if attempts > 1 else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *keepalive.client_options(),
    ]


class ResponseCache:
    """A bounded LRU of responses to deterministic requests, keyed by method and the request's
    canonical (deterministic) serialization; a hit gets a request_id of its own ("cached-...")."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def get(self, method: str, request: Message, kind: type[ResponseT]) -> ResponseT | None:
        if self.size <= 0:
            return None
        key = (method, request.SerializeToString(deterministic=True))
        stored = self._entries.get(key)
        if stored is None:
            self.misses += 1
            CACHE_MISSES.labels(method).inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        CACHE_HITS.labels(method).inc()
        response = kind.FromString(stored)
        # An answer from the cache is still a request of its own: it must not repeat the id of
        # the request that filled the entry.
        if "request_id" in response.DESCRIPTOR.fields_by_name:
            setattr(response, "request_id", f"cached-{uuid.uuid4().hex[:16]}")  # noqa: B010
        return response

    def put(self, method: str, request: Message, response: Message) -> None:
        if self.size <= 0:
            return
        self._entries[(method, request.SerializeToString(deterministic=True))] = response.SerializeToString()
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count

    def __len__(self) -> int:
        return len(self._entries)


GenerationRequest = (
    generation_pb2.GenerateRequest
    | generation_pb2.ChatRequest
    | generation_pb2.SolveMathRequest
    | generation_pb2.SolveCodingRequest
)


def is_deterministic(request: GenerationRequest) -> bool:
    """Whether the same request always gets the same answer (so its response may be cached)."""
    return sampling.is_deterministic(request.parameters)


def call_options(context: Context, tracing: bool) -> tuple[float | None, tuple[tuple[str, str], ...]]:
    """The client's remaining deadline and the metadata the backends may see."""
    dropped = TRACE_HEADERS if tracing else frozenset()
    metadata = tuple(
        (key, value)
        for key, value in (context.invocation_metadata() or ())
        if key in FORWARDED_HEADERS and key not in dropped and isinstance(value, str)
    )
    return context.time_remaining(), metadata


def _usage_tokens(response: Message) -> int:
    if "usage" in response.DESCRIPTOR.fields_by_name and response.HasField("usage"):
        return int(getattr(response, "usage").total_tokens)  # noqa: B009
    return 0


class Backend:
    """One backend kind (generator or embedder): a load-balanced channel over its replicas and one
    direct channel per named replica for the per-replica health and statistics."""

    def __init__(
        self,
        name: str,
        addresses: str,
        attempts: int,
        interceptors: Sequence[Any],
        tracing: bool,
        tls_files: tls.TlsFiles = tls.PLAINTEXT,
    ) -> None:
        self.name = name
        self.target, self.replicas = grpc_target(addresses)
        self.tracing = tracing
        options = channel_options(attempts)
        self.channel = tls.aio_channel(
            self.target, tls_files, options=options, interceptors=list(interceptors)
        )
        self.replica_channels = {
            address: tls.aio_channel(address, tls_files, options=channel_options(1))
            for address in self.replicas
        }

    def info_stubs(self) -> dict[str, info_pb2_grpc.InfoServiceAsyncStub]:
        return {
            address: info_pb2_grpc.InfoServiceStub(channel)
            for address, channel in self.replica_channels.items()
        }

    async def close(self) -> None:
        await self.channel.close()
        for channel in self.replica_channels.values():
            await channel.close()


class Backends:
    """The calls the gateway's servicers make; the only place that talks to the backends."""

    def __init__(self, generator: Backend, embedder: Backend, cache: ResponseCache) -> None:
        self.generator = generator
        self.embedder = embedder
        self.cache = cache
        self._generation = generation_pb2_grpc.GenerationServiceStub(generator.channel)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(embedder.channel)

    async def _unary(
        self,
        backend: Backend,
        method: str,
        callable_: grpc.aio.UnaryUnaryMultiCallable[Any, ResponseT],
        request: Message,
        kind: type[ResponseT],
        context: Context,
        cacheable: bool,
    ) -> ResponseT:
        if cacheable:
            cached = self.cache.get(method, request, kind)
            if cached is not None:
                charge_tokens(_usage_tokens(cached))
                return cached
        timeout, metadata = call_options(context, backend.tracing)
        try:
            response: ResponseT = await callable_(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            BACKEND_ERRORS.labels(method, error.code().name).inc()
            raise
        charge_tokens(_usage_tokens(response))
        if cacheable:
            self.cache.put(method, request, response)
        return response

    async def generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> generation_pb2.GenerateResponse:
        return await self._unary(
            self.generator,
            "Generate",
            self._generation.Generate,
            request,
            generation_pb2.GenerateResponse,
            context,
            is_deterministic(request),
        )

    async def chat(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> generation_pb2.ChatResponse:
        return await self._unary(
            self.generator,
            "Chat",
            self._generation.Chat,
            request,
            generation_pb2.ChatResponse,
            context,
            is_deterministic(request),
        )

    async def solve_math(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> generation_pb2.SolveMathResponse:
        return await self._unary(
            self.generator,
            "SolveMath",
            self._generation.SolveMath,
            request,
            generation_pb2.SolveMathResponse,
            context,
            is_deterministic(request),
        )

    async def solve_coding(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> generation_pb2.SolveCodingResponse:
        return await self._unary(
            self.generator,
            "SolveCoding",
            self._generation.SolveCoding,
            request,
            generation_pb2.SolveCodingResponse,
            context,
            is_deterministic(request),
        )

    async def _stream(
        self,
        method: str,
        callable_: grpc.aio.UnaryStreamMultiCallable[Any, generation_pb2.GenerateStreamResponse],
        request: Message,
        context: Context,
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        timeout, metadata = call_options(context, self.generator.tracing)
        call = callable_(request, timeout=timeout, metadata=metadata)
        try:
            async for message in call:
                if message.HasField("usage"):
                    charge_tokens(message.usage.total_tokens)
                yield message
        except grpc.aio.AioRpcError as error:
            BACKEND_ERRORS.labels(method, error.code().name).inc()
            raise
        finally:
            # The client went away (CancelledError/GeneratorExit) or the stream ended: either way the
            # backend's batch slot must be freed now, not when its deadline passes.
            call.cancel()

    def generate_stream(
        self, request: generation_pb2.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream("GenerateStream", self._generation.GenerateStream, request, context)

    def chat_stream(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream("ChatStream", self._generation.ChatStream, request, context)

    def solve_math_stream(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream("SolveMathStream", self._generation.SolveMathStream, request, context)

    def solve_coding_stream(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream("SolveCodingStream", self._generation.SolveCodingStream, request, context)

    async def embed(
        self, request: embedding_pb2.EmbedRequest, context: Context
    ) -> embedding_pb2.EmbedResponse:
        return await self._unary(
            self.embedder, "Embed", self._embedding.Embed, request, embedding_pb2.EmbedResponse, context, True
        )

    async def preload(
        self, request: embedding_pb2.PreloadModelsRequest, context: Context
    ) -> embedding_pb2.PreloadModelsResponse:
        return await self._unary(
            self.embedder,
            "PreloadModels",
            self._embedding.PreloadModels,
            request,
            embedding_pb2.PreloadModelsResponse,
            context,
            False,
        )

    async def cache_status(
        self, request: embedding_pb2.GetCacheStatusRequest, context: Context
    ) -> embedding_pb2.GetCacheStatusResponse:
        return await self._unary(
            self.embedder,
            "GetCacheStatus",
            self._embedding.GetCacheStatus,
            request,
            embedding_pb2.GetCacheStatusResponse,
            context,
            False,
        )

    async def clear_cache(
        self, request: embedding_pb2.ClearCacheRequest, context: Context
    ) -> embedding_pb2.ClearCacheResponse:
        return await self._unary(
            self.embedder,
            "ClearCache",
            self._embedding.ClearCache,
            request,
            embedding_pb2.ClearCacheResponse,
            context,
            False,
        )

    async def model_counter(
        self, request: embedding_pb2.GetModelCounterRequest, context: Context
    ) -> embedding_pb2.GetModelCounterResponse:
        return await self._unary(
            self.embedder,
            "GetModelCounter",
            self._embedding.GetModelCounter,
            request,
            embedding_pb2.GetModelCounterResponse,
            context,
            False,
        )

    async def close(self) -> None:
        await asyncio.gather(self.generator.close(), self.embedder.close())
