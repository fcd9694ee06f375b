"""The synchronous client."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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
)

from inference_client import _convert
from inference_client._channel import RetryPolicy, call_metadata, channel_options
from inference_client._convert import MessageLike
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
