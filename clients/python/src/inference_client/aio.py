"""The asyncio client: the same calls as `InferenceClient`, awaited."""

# `timeout` here is the gRPC deadline, which travels to the server and ends its work there too;
# asyncio.timeout would only stop waiting on this side.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
import grpc.aio
from inference.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

from inference_client import _convert
from inference_client._channel import RetryPolicy, call_metadata, channel_options
from inference_client._convert import MessageLike
from inference_client.client import DEFAULT_TIMEOUT
from inference_client.errors import from_rpc_error
from inference_client.options import ChatOptions, GenerateOptions
from inference_client.types import (
    CacheStatus,
    ChatReply,
    ComponentStats,
    EmbeddingInput,
    Embeddings,
    EncodingFormat,
    FinishReason,
    Generation,
    Health,
    Model,
    StreamSummary,
    StreamToken,
    TokenLogprob,
    Usage,
)

_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_StreamCall = grpc.aio.UnaryStreamCall[
    generation_pb2.GenerateStreamRequest, generation_pb2.GenerateStreamResponse
]


class AsyncTokenStream:
    """The tokens of a streaming generation as they arrive; `async for` it once.

    After the loop, `finish_reason`, `usage` and `summaries` hold what the final message carried.
    `cancel()` or the end of an `async with` block cancels the RPC at once, which frees the
    server's slot; a loop left with `break` cancels it when asyncio closes the iterator."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[Any, generation_pb2.GenerateStreamResponse],
    ) -> None:
        self._call = call
        self._state = _convert.StreamState()

    async def _tokens(self) -> AsyncIterator[StreamToken]:
        try:
            async for message in self._call:
                token = self._state.feed(message)
                if token is not None:
                    yield token
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            self._call.cancel()
        self._state.done = True

    def __aiter__(self) -> AsyncIterator[StreamToken]:
        return self._tokens()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()

    def cancel(self) -> None:
        self._call.cancel()

    @property
    def done(self) -> bool:
        return self._state.done

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def text(self) -> str:
        return self._state.text(0)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._state.finish_reason(0)

    @property
    def usage(self) -> Usage | None:
        return self._state.usage

    @property
    def prompt_tokens(self) -> tuple[TokenLogprob, ...]:
        """The prompt's tokens with their logprobs (with prompt_logprobs; from the first message)."""
        return self._state.prompt_tokens

    @property
    def summaries(self) -> dict[int, StreamSummary]:
        return dict(self._state.summaries)


class AsyncInferenceClient:
    """asyncio client of one tier (gateway, generator or embedder) over gRPC.

    Create it inside the event loop that uses it. `timeout` is the default deadline of every call
    in seconds (None: no deadline); each method takes its own `timeout` too. `api_key` is sent as
    `authorization: Bearer <key>`. Unary calls that fail with UNAVAILABLE are retried with backoff
    per `retry`.
    """

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address
        self.timeout = timeout
        all_options = [*channel_options(retry or RetryPolicy()), *options]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=all_options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=all_options)
        self._metadata = call_metadata(api_key)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._info = info_pb2_grpc.InfoServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Reply],
        request: _Request,
        timeout: float | None,
    ) -> _Reply:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def generate(
        self,
        prompt: str = "",
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Generation:
        """Generates a completion of `prompt` (or of chat `messages`) and returns it whole; with
        json_schema or json_object, `parsed` holds the parsed (or model-validated) output."""
        request = _convert.generate_request(prompt, messages, options)
        generated = _convert.generation(await self._unary(self._generation.Generate, request, timeout))
        return _convert.generation_parsed(generated, _convert.parser(options))

    def stream(
        self,
        prompt: str = "",
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncTokenStream:
        """Starts a generation; `async for token in client.stream(...)` gets its tokens as they are
        decoded. `timeout` bounds the whole stream. Streams are not retried."""
        request = _convert.stream_request(prompt, messages, options)
        call = self._generation.GenerateStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return AsyncTokenStream(call)

    async def chat(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatReply:
        """Answers a conversation of (role, content) pairs or ChatMessages; with json_schema or
        json_object, `parsed` holds the parsed (or model-validated) reply."""
        request = _convert.chat_request(messages, options)
        reply = _convert.chat_reply(await self._unary(self._generation.Chat, request, timeout))
        return _convert.chat_parsed(reply, _convert.parser(options))

    def chat_stream(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> AsyncTokenStream:
        """Answers a conversation as a token stream (the messages of `stream`). Not retried."""
        request = _convert.chat_request(messages, options)
        call = self._generation.ChatStream(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return AsyncTokenStream(call)

    def solve_math_stream(
        self, problem: str, *, timeout: float | None = None, **options: Unpack[ChatOptions]
    ) -> AsyncTokenStream:
        """Solves a math problem as a token stream; each sequence's summary carries the `answer`."""
        request = _convert.solve_math_request(problem, options)
        call = self._generation.SolveMathStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return AsyncTokenStream(call)

    def solve_coding_stream(
        self,
        problem: str,
        *,
        language: str = "",
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> AsyncTokenStream:
        """Writes code for a task as a token stream; each sequence's summary carries the `code`
        and its `language` ("python" when empty)."""
        request = _convert.solve_coding_request(problem, language, options)
        call = self._generation.SolveCodingStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return AsyncTokenStream(call)

    async def embed(
        self,
        inputs: EmbeddingInput,
        *,
        model: str = "",
        normalize: bool | None = None,
        dimensions: int | None = None,
        encoding_format: EncodingFormat = "float",
        truncate: bool | None = None,
        timeout: float | None = None,
    ) -> Embeddings:
        """Embeds a string, strings, token ids or lists of token ids; one vector per input."""
        request = _convert.embed_request(inputs, model, normalize, dimensions, encoding_format, truncate)
        return _convert.embeddings(await self._unary(self._embedding.Embed, request, timeout))

    async def models(self, *, timeout: float | None = None) -> list[Model]:
        reply = await self._unary(self._info.ListServedModels, info_pb2.ListServedModelsRequest(), timeout)
        return _convert.models(reply)

    async def health(self, *, timeout: float | None = None) -> Health:
        reply = await self._unary(self._info.GetHealth, info_pb2.GetHealthRequest(), timeout)
        return _convert.health(reply)

    async def stats(self, *, timeout: float | None = None) -> list[ComponentStats]:
        """Counters of this tier and, from the gateway, of the backends it reaches (this tier first)."""
        reply = await self._unary(self._info.GetStats, info_pb2.GetStatsRequest(), timeout)
        return _convert.stats(reply)

    async def cache_status(self, *, timeout: float | None = None) -> CacheStatus:
        """The embedder's model cache: loaded models, their memory, the budget (needs `embed`)."""
        reply = await self._unary(
            self._embedding.GetCacheStatus, embedding_pb2.GetCacheStatusRequest(), timeout
        )
        return _convert.cache_status(reply)
