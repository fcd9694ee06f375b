"""The synchronous client."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
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

DEFAULT_TIMEOUT = 120.0
"""Seconds a call may take unless the client or the call says otherwise."""


class TokenStream:
    """The tokens of a streaming generation as they arrive; iterate it once.

    After the loop, `finish_reason`, `usage` and `summary` hold what the final message carried.
    Leaving it early (or `cancel()`) cancels the RPC, which frees the server's slot."""

    def __init__(
        self, call: Iterator[generation_pb2.GenerateStreamResponse], cancel: Callable[[], bool]
    ) -> None:
        self._call = call
        self._cancel = cancel
        self._state = _convert.StreamState()

    def __iter__(self) -> Iterator[StreamToken]:
        try:
            for message in self._call:
                token = self._state.feed(message)
                if token is not None:
                    yield token
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            # A consumer that stops early (break, exception) must not leave the server generating.
            self._cancel()
        self._state.done = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cancel()

    def cancel(self) -> None:
        self._cancel()

    @property
    def done(self) -> bool:
        """True once the server ended the stream normally."""
        return self._state.done

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def text(self) -> str:
        """The text received so far for the first sequence."""
        return self._state.text(0)

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the first sequence stopped; None until its last message arrived."""
        return self._state.finish_reason(0)

    @property
    def usage(self) -> Usage | None:
        """Token counts of the request; None until the last message arrived."""
        return self._state.usage

    @property
    def prompt_tokens(self) -> tuple[TokenLogprob, ...]:
        """The prompt's tokens with their logprobs (with prompt_logprobs; from the first message)."""
        return self._state.prompt_tokens

    @property
    def summaries(self) -> dict[int, StreamSummary]:
        """The final message of each finished sequence, by sequence index."""
        return dict(self._state.summaries)


class InferenceClient:
    """Blocking client of one tier (gateway, generator or embedder) over gRPC.

    `timeout` is the default deadline of every call in seconds (None: no deadline); each method
    takes its own `timeout` too. `api_key` is sent as `authorization: Bearer <key>`. Unary calls
    that fail with UNAVAILABLE are retried with backoff per `retry`.
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
            self._channel = grpc.insecure_channel(address, options=all_options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=all_options)
        self._metadata = call_metadata(api_key)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._info = info_pb2_grpc.InfoServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Reply],
        request: _Request,
        timeout: float | None,
    ) -> _Reply:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def generate(
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
        generated = _convert.generation(self._unary(self._generation.Generate, request, timeout))
        return _convert.generation_parsed(generated, _convert.parser(options))

    def stream(
        self,
        prompt: str = "",
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> TokenStream:
        """Starts a generation and returns its tokens as they are decoded.

        `timeout` bounds the whole stream. Streams are not retried: tokens already shown cannot be
        taken back."""
        request = _convert.stream_request(prompt, messages, options)
        call = self._generation.GenerateStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return TokenStream(call, call.cancel)

    def chat(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatReply:
        """Answers a conversation of (role, content) pairs or ChatMessages; with json_schema or
        json_object, `parsed` holds the parsed (or model-validated) reply."""
        request = _convert.chat_request(messages, options)
        reply = _convert.chat_reply(self._unary(self._generation.Chat, request, timeout))
        return _convert.chat_parsed(reply, _convert.parser(options))

    def chat_stream(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> TokenStream:
        """Answers a conversation as a token stream (the messages of `stream`). Not retried."""
        request = _convert.chat_request(messages, options)
        call = self._generation.ChatStream(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return TokenStream(call, call.cancel)

    def solve_math_stream(
        self, problem: str, *, timeout: float | None = None, **options: Unpack[ChatOptions]
    ) -> TokenStream:
        """Solves a math problem as a token stream; each sequence's summary carries the `answer`."""
        request = _convert.solve_math_request(problem, options)
        call = self._generation.SolveMathStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return TokenStream(call, call.cancel)

    def solve_coding_stream(
        self,
        problem: str,
        *,
        language: str = "",
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> TokenStream:
        """Writes code for a task as a token stream; each sequence's summary carries the `code`
        and its `language` ("python" when empty)."""
        request = _convert.solve_coding_request(problem, language, options)
        call = self._generation.SolveCodingStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return TokenStream(call, call.cancel)

    def embed(
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
        """Embeds a string, strings, token ids or lists of token ids; one vector per input.

        `encoding_format="base64"` moves little-endian float32 bytes on the wire; the vectors come
        back as floats either way."""
        request = _convert.embed_request(inputs, model, normalize, dimensions, encoding_format, truncate)
        return _convert.embeddings(self._unary(self._embedding.Embed, request, timeout))

    def models(self, *, timeout: float | None = None) -> list[Model]:
        reply = self._unary(self._info.ListServedModels, info_pb2.ListServedModelsRequest(), timeout)
        return _convert.models(reply)

    def health(self, *, timeout: float | None = None) -> Health:
        """Health with device and memory details of this tier and the backends it reaches."""
        reply = self._unary(self._info.GetHealth, info_pb2.GetHealthRequest(), timeout)
        return _convert.health(reply)

    def stats(self, *, timeout: float | None = None) -> list[ComponentStats]:
        """Counters of this tier and, from the gateway, of the backends it reaches (this tier first)."""
        reply = self._unary(self._info.GetStats, info_pb2.GetStatsRequest(), timeout)
        return _convert.stats(reply)

    def cache_status(self, *, timeout: float | None = None) -> CacheStatus:
        """The embedder's model cache: loaded models, their memory, the budget (needs `embed`)."""
        reply = self._unary(self._embedding.GetCacheStatus, embedding_pb2.GetCacheStatusRequest(), timeout)
        return _convert.cache_status(reply)


class PredictionStream:
    """A prediction's output text as it is produced; iterate it once (chunks of text). Ends when
    the prediction ends. Leaving early (or `cancel()`) stops watching; the prediction goes on."""

    def __init__(self, tokens: TokenStream) -> None:
        self._tokens = tokens

    def __iter__(self) -> Iterator[str]:
        for token in self._tokens:
            yield token.text

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tokens.cancel()

    def cancel(self) -> None:
        self._tokens.cancel()

    @property
    def done(self) -> bool:
        """True once the server ended the stream normally."""
        return self._tokens.done

    @property
    def text(self) -> str:
        """The text received so far."""
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


class PredictionsClient:
    """Blocking client of the predictions service (asynchronous jobs, as Replicate serves them)
    over gRPC: directly (port 50054) or through Envoy (8080), which routes it there.

    `api_key` is sent as `authorization: Bearer <key>`; the service runs each prediction with it.
    `timeout` is the default deadline of every call in seconds. Reads and cancels that fail with
    UNAVAILABLE are retried per `retry`; creates and deployment changes never are (a retry could
    make a second job)."""

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
            self._channel = grpc.insecure_channel(address, options=all_options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=all_options)
        self._metadata = call_metadata(api_key)
        self._stub = predictions_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Reply],
        request: _Request,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> _Reply:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata + metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def create(
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
        """Creates a prediction of `model` (a deployment's name or a served model id) on `input`
        (the task's request without "model" and "stream"). With `wait` (seconds) the server holds
        the reply until the prediction ends or that time passes (Replicate's `Prefer: wait`)."""
        request = _convert.create_prediction_request(model, input, version, webhook, webhook_events_filter)
        metadata = _convert.wait_metadata(wait)
        return _convert.prediction(self._unary(self._stub.CreatePrediction, request, timeout, metadata))

    def get(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        request = predictions_pb2.GetPredictionRequest(id=prediction_id)
        return _convert.prediction(self._unary(self._stub.GetPrediction, request, timeout))

    def list(
        self,
        *,
        status: str | None = None,
        cursor: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
    ) -> PredictionPage:
        """One page of this key's predictions (an admin key: everyone's), newest first."""
        request = _convert.list_predictions_request(status, cursor, page_size)
        return _convert.prediction_page(self._unary(self._stub.ListPredictions, request, timeout))

    def cancel(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        """Ends a prediction that has not ended (a running generation stops in the generator)."""
        request = predictions_pb2.CancelPredictionRequest(id=prediction_id)
        return _convert.prediction(self._unary(self._stub.CancelPrediction, request, timeout))

    def wait(
        self, prediction_id: str, timeout: float | None = None, *, poll_interval: float = 0.25
    ) -> Prediction:
        """Polls until the prediction ends and returns it; DeadlineExceededError after `timeout`
        seconds (None: the client's timeout, and no limit when that is None too)."""
        limit = self._deadline(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            current = self.get(prediction_id)
            if current.done:
                return current
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"prediction {prediction_id} still {current.status} after {limit:g}s",
                )
            time.sleep(poll_interval)

    def stream(self, prediction_id: str, *, timeout: float | None = None) -> PredictionStream:
        """The prediction's output text as it is produced, from its start; the stream ends when
        the prediction ends. Not retried."""
        request = predictions_pb2.StreamPredictionRequest(id=prediction_id)
        call = self._stub.StreamPrediction(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return PredictionStream(TokenStream(call, call.cancel))

    def create_deployment(
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
        """Creates a named entry for a served model (admin scope)."""
        message = _convert.deployment_message(name, model, task, version, defaults, input_schema, description)
        request = predictions_pb2.CreateDeploymentRequest(deployment=message)
        return _convert.deployment(self._unary(self._stub.CreateDeployment, request, timeout))

    def get_deployment(self, name: str, *, timeout: float | None = None) -> Deployment:
        request = predictions_pb2.GetDeploymentRequest(name=name)
        return _convert.deployment(self._unary(self._stub.GetDeployment, request, timeout))

    def list_deployments(self, *, timeout: float | None = None) -> builtins.list[Deployment]:
        request = predictions_pb2.ListDeploymentsRequest()
        reply = self._unary(self._stub.ListDeployments, request, timeout)
        return [_convert.deployment(item) for item in reply.results]

    def update_deployment(
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
        """Changes the fields given (admin scope); the others stay."""
        request = _convert.update_deployment_request(
            name, model, task, version, defaults, input_schema, description
        )
        return _convert.deployment(self._unary(self._stub.UpdateDeployment, request, timeout))

    def delete_deployment(self, name: str, *, timeout: float | None = None) -> None:
        """Deletes the entry (admin scope); NotFoundError when there is none."""
        request = predictions_pb2.DeleteDeploymentRequest(name=name)
        self._unary(self._stub.DeleteDeployment, request, timeout)

    def webhook_secret(self, *, timeout: float | None = None) -> str:
        """The "whsec_..." key every webhook is signed with (admin scope), for standardwebhooks."""
        reply = self._unary(self._stub.GetWebhookSecret, predictions_pb2.GetWebhookSecretRequest(), timeout)
        return reply.key
