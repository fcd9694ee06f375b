"""The asyncio client: the same calls as `InferenceClient`, awaited."""

# `timeout` here is the gRPC deadline, which travels to the server and ends its work there too;
# asyncio.timeout would only stop waiting on this side.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
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
    predictions_pb2,
    predictions_pb2_grpc,
)

from inference_client import _convert
from inference_client._channel import RetryPolicy, call_metadata, channel_options
from inference_client._convert import MessageLike
from inference_client.client import DEFAULT_TIMEOUT
from inference_client.errors import DeadlineExceededError, from_rpc_error
from inference_client.options import ChatOptions, GenerateOptions
from inference_client.types import (
    CacheStatus,
    ChatReply,
    ComponentStats,
    Deployment,
    EmbeddingInput,
    Embeddings,
    EncodingFormat,
    FinishReason,
    Generation,
    Health,
    Model,
    Prediction,
    PredictionPage,
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


class AsyncPredictionStream:
    """A prediction's output text as it is produced; `async for` it once (chunks of text). Ends
    when the prediction ends. `cancel()` stops watching; the prediction goes on."""

    def __init__(self, tokens: AsyncTokenStream) -> None:
        self._tokens = tokens

    async def _chunks(self) -> AsyncIterator[str]:
        async for token in self._tokens:
            yield token.text

    def __aiter__(self) -> AsyncIterator[str]:
        return self._chunks()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._tokens.cancel()

    def cancel(self) -> None:
        self._tokens.cancel()

    @property
    def done(self) -> bool:
        return self._tokens.done

    @property
    def text(self) -> str:
        return self._tokens.text

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._tokens.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._tokens.usage

    @property
    def summaries(self) -> dict[int, StreamSummary]:
        return self._tokens.summaries


class AsyncPredictionsClient:
    """asyncio client of the predictions service: the calls of `PredictionsClient`, awaited.

    Create it inside the event loop that uses it. Reads and cancels that fail with UNAVAILABLE
    are retried per `retry`; creates and deployment changes never are."""

    def __init__(
        self,
        address: str = "localhost:50054",
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
        self._stub = predictions_pb2_grpc.PredictionServiceStub(self._channel)

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
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> _Reply:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata + metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def create(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        webhook: str | None = None,
        webhook_events_filter: Sequence[str] | None = None,
        wait: float | None = None,
        version: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Creates a prediction; with `wait` (seconds) the reply is held until it ends or that
        time passes (Replicate's `Prefer: wait`)."""
        request = _convert.create_prediction_request(model, input, version, webhook, webhook_events_filter)
        metadata = _convert.wait_metadata(wait)
        reply = await self._unary(self._stub.CreatePrediction, request, timeout, metadata)
        return _convert.prediction(reply)

    async def get(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        request = predictions_pb2.GetPredictionRequest(id=prediction_id)
        return _convert.prediction(await self._unary(self._stub.GetPrediction, request, timeout))

    async def list(
        self,
        *,
        status: str | None = None,
        cursor: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
    ) -> PredictionPage:
        request = _convert.list_predictions_request(status, cursor, page_size)
        return _convert.prediction_page(await self._unary(self._stub.ListPredictions, request, timeout))

    async def cancel(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        request = predictions_pb2.CancelPredictionRequest(id=prediction_id)
        return _convert.prediction(await self._unary(self._stub.CancelPrediction, request, timeout))

    async def wait(
        self, prediction_id: str, timeout: float | None = None, *, poll_interval: float = 0.25
    ) -> Prediction:
        """Polls until the prediction ends; DeadlineExceededError after `timeout` seconds."""
        limit = self._deadline(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            current = await self.get(prediction_id)
            if current.done:
                return current
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"prediction {prediction_id} still {current.status} after {limit:g}s",
                )
            await asyncio.sleep(poll_interval)

    def stream(self, prediction_id: str, *, timeout: float | None = None) -> AsyncPredictionStream:
        """The prediction's output text as it is produced; ends when the prediction ends."""
        request = predictions_pb2.StreamPredictionRequest(id=prediction_id)
        call = self._stub.StreamPrediction(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return AsyncPredictionStream(AsyncTokenStream(call))

    async def create_deployment(
        self,
        name: str,
        model: str,
        task: str,
        *,
        version: str = "",
        defaults: Mapping[str, Any] | None = None,
        input_schema: Mapping[str, Any] | None = None,
        description: str = "",
        timeout: float | None = None,
    ) -> Deployment:
        message = _convert.deployment_message(name, model, task, version, defaults, input_schema, description)
        request = predictions_pb2.CreateDeploymentRequest(deployment=message)
        return _convert.deployment(await self._unary(self._stub.CreateDeployment, request, timeout))

    async def get_deployment(self, name: str, *, timeout: float | None = None) -> Deployment:
        request = predictions_pb2.GetDeploymentRequest(name=name)
        return _convert.deployment(await self._unary(self._stub.GetDeployment, request, timeout))

    async def list_deployments(self, *, timeout: float | None = None) -> builtins.list[Deployment]:
        request = predictions_pb2.ListDeploymentsRequest()
        reply = await self._unary(self._stub.ListDeployments, request, timeout)
        return [_convert.deployment(item) for item in reply.results]

    async def update_deployment(
        self,
        name: str,
        *,
        model: str | None = None,
        task: str | None = None,
        version: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        input_schema: Mapping[str, Any] | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> Deployment:
        request = _convert.update_deployment_request(
            name, model, task, version, defaults, input_schema, description
        )
        return _convert.deployment(await self._unary(self._stub.UpdateDeployment, request, timeout))

    async def delete_deployment(self, name: str, *, timeout: float | None = None) -> None:
        request = predictions_pb2.DeleteDeploymentRequest(name=name)
        await self._unary(self._stub.DeleteDeployment, request, timeout)

    async def webhook_secret(self, *, timeout: float | None = None) -> str:
        request = predictions_pb2.GetWebhookSecretRequest()
        reply = await self._unary(self._stub.GetWebhookSecret, request, timeout)
        return reply.key
