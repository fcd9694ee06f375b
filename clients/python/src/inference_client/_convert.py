"""Protobuf at the edge: request messages from Python arguments, dataclasses from replies. Shared
by the sync and asyncio clients so that both behave the same."""

from __future__ import annotations

import dataclasses
import json
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, info_pb2

from inference_client.options import CONSTRAINTS, ChatOptions, GenerateOptions, JsonSchema
from inference_client.types import (
    CachedModel,
    CacheStatus,
    ChatMessage,
    ChatReply,
    ComponentHealth,
    ComponentStats,
    DeviceInfo,
    EmbeddingInput,
    Embeddings,
    EncodingFormat,
    FinishReason,
    GeneratedSequence,
    Generation,
    Health,
    MemoryInfo,
    Model,
    ServingStatus,
    StreamSummary,
    StreamToken,
    TokenLogprob,
    TopLogprob,
    Usage,
)

MessageLike = ChatMessage | tuple[str, str]
"""A chat turn: a ChatMessage or a (role, content) pair."""
Parser = Callable[[str], Any]


def _stop_value(stop: str | Sequence[str] | None) -> struct_pb2.Value | None:
    if stop is None:
        return None
    value = struct_pb2.Value()
    if isinstance(stop, str):
        value.string_value = stop
    else:
        value.list_value.extend(list(stop))
    return value


def _messages(messages: Iterable[MessageLike]) -> list[common_pb2.ChatMessage]:
    result = []
    for message in messages:
        if isinstance(message, ChatMessage):
            result.append(common_pb2.ChatMessage(role=message.role, content=message.content))
        else:
            role, content = message
            result.append(common_pb2.ChatMessage(role=role, content=content))
    return result


def _schema_dict(schema: JsonSchema) -> Mapping[str, Any]:
    if isinstance(schema, Mapping):
        return schema
    return schema.model_json_schema()


def _constraint(options: ChatOptions | GenerateOptions, parameters: common_pb2.SamplingParameters) -> None:
    given = [name for name in CONSTRAINTS if name in options]
    if len(given) > 1:
        raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
    if "json_schema" in options:
        json_format.ParseDict(dict(_schema_dict(options["json_schema"])), parameters.json_schema)
    if "json_object" in options:
        parameters.json_object = options["json_object"]
    if "regex" in options:
        parameters.regex = options["regex"]
    if "choice" in options:
        parameters.choice.extend(list(options["choice"]))
    if "grammar" in options:
        parameters.grammar = options["grammar"]


def sampling_parameters(options: ChatOptions | GenerateOptions) -> common_pb2.SamplingParameters:
    """The knobs among the keyword options (all but `model`) as the request's `parameters`."""
    skipped = ("model", "stop", *CONSTRAINTS)
    knobs: dict[str, Any] = {k: v for k, v in options.items() if k not in skipped}
    parameters = common_pb2.SamplingParameters(**knobs)
    stop = _stop_value(options.get("stop"))
    if stop is not None:
        parameters.stop.CopyFrom(stop)
    _constraint(options, parameters)
    return parameters


def parser(options: ChatOptions | GenerateOptions) -> Parser | None:
    """How the reply's text becomes `parsed`: json_object and a dict schema parse JSON, a model
    class validates into an instance; None without those constraints."""
    schema = options.get("json_schema")
    if schema is not None and not isinstance(schema, Mapping):
        return schema.model_validate_json
    if schema is not None or options.get("json_object"):
        return json.loads
    return None


def _parse(parse: Parser, text: str) -> Any:
    try:
        return parse(text)
    except ValueError:
        # Cut short by max_new_tokens (finish_reason says so); pydantic's errors are ValueErrors.
        return None


def generation_parsed(reply: Generation, parse: Parser | None) -> Generation:
    """The reply with `parsed` filled in, and each sequence's."""
    if parse is None:
        return reply
    sequences = tuple(dataclasses.replace(s, parsed=_parse(parse, s.text)) for s in reply.sequences)
    return dataclasses.replace(reply, parsed=_parse(parse, reply.text), sequences=sequences)


def chat_parsed(reply: ChatReply, parse: Parser | None) -> ChatReply:
    """The reply with `parsed` filled in."""
    return reply if parse is None else dataclasses.replace(reply, parsed=_parse(parse, reply.text))


def generate_request(
    prompt: str, messages: Iterable[MessageLike] | None, options: GenerateOptions
) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        messages=_messages(messages or ()),
        model=options.get("model", ""),
        parameters=sampling_parameters(options),
    )


def stream_request(
    prompt: str, messages: Iterable[MessageLike] | None, options: GenerateOptions
) -> generation_pb2.GenerateStreamRequest:
    return generation_pb2.GenerateStreamRequest(
        prompt=prompt,
        messages=_messages(messages or ()),
        model=options.get("model", ""),
        parameters=sampling_parameters(options),
    )


def chat_request(messages: Iterable[MessageLike], options: ChatOptions) -> generation_pb2.ChatRequest:
    return generation_pb2.ChatRequest(
        messages=_messages(messages), model=options.get("model", ""), parameters=sampling_parameters(options)
    )


def solve_math_request(problem: str, options: ChatOptions) -> generation_pb2.SolveMathRequest:
    return generation_pb2.SolveMathRequest(
        problem=problem, model=options.get("model", ""), parameters=sampling_parameters(options)
    )


def solve_coding_request(
    problem: str, language: str, options: ChatOptions
) -> generation_pb2.SolveCodingRequest:
    return generation_pb2.SolveCodingRequest(
        problem=problem,
        language=language,
        model=options.get("model", ""),
        parameters=sampling_parameters(options),
    )


def _input_value(inputs: EmbeddingInput) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(inputs, str):
        value.string_value = inputs
        return value
    items = value.list_value
    for item in inputs:
        if isinstance(item, str | int):
            items.append(item)
        else:
            items.add_list().extend(list(item))
    return value


_ENCODINGS: dict[str, embedding_pb2.EncodingFormat.ValueType] = {
    "float": embedding_pb2.ENCODING_FORMAT_FLOAT,
    "base64": embedding_pb2.ENCODING_FORMAT_BASE64,
}


def embed_request(
    inputs: EmbeddingInput,
    model: str,
    normalize: bool | None,
    dimensions: int | None,
    encoding_format: EncodingFormat,
    truncate: bool | None,
) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(
        input=_input_value(inputs),
        model=model,
        normalize=normalize,
        dimensions=dimensions,
        encoding_format=_ENCODINGS[encoding_format],
        truncate=truncate,
    )


def finish_reason(value: common_pb2.FinishReason.ValueType) -> FinishReason:
    return {
        common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
        common_pb2.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
        common_pb2.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
        common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE: FinishReason.CONSTRAINT_COMPLETE,
    }.get(value, FinishReason.UNSPECIFIED)


def usage(value: common_pb2.Usage) -> Usage:
    return Usage(value.prompt_tokens, value.completion_tokens, value.total_tokens)


def _top(items: Iterable[common_pb2.TopLogprob]) -> tuple[TopLogprob, ...]:
    return tuple(TopLogprob(item.id, item.text, item.logprob, item.bytes) for item in items)


def token_logprobs(tokens: Iterable[common_pb2.Token], prompt: bool = False) -> tuple[TokenLogprob, ...]:
    """Tokens with their logprobs; of a prompt's, the first has none."""
    return tuple(
        TokenLogprob(
            id=token.id,
            text=token.piece,
            logprob=None if prompt and number == 0 else token.logprob,
            bytes=token.piece_bytes,
            special=token.special,
            top_logprobs=_top(token.top_logprobs),
        )
        for number, token in enumerate(tokens)
    )


def generation(reply: generation_pb2.GenerateResponse) -> Generation:
    return Generation(
        request_id=reply.request_id,
        text=reply.generated_text,
        tokens_generated=reply.tokens_generated,
        generation_time=reply.generation_time,
        tokens_per_second=reply.tokens_per_second,
        finish_reason=finish_reason(reply.finish_reason),
        usage=usage(reply.usage),
        model=reply.model,
        sequences=tuple(
            GeneratedSequence(
                item.index,
                item.text,
                item.tokens_generated,
                finish_reason(item.finish_reason),
                token_logprobs(item.tokens),
            )
            for item in reply.sequences
        ),
        tokens=token_logprobs(reply.tokens),
        prompt_tokens=token_logprobs(reply.prompt_tokens, prompt=True),
    )


def chat_reply(reply: generation_pb2.ChatResponse) -> ChatReply:
    return ChatReply(
        request_id=reply.request_id,
        message=ChatMessage(reply.message.role, reply.message.content),
        tokens_generated=reply.tokens_generated,
        generation_time=reply.generation_time,
        tokens_per_second=reply.tokens_per_second,
        finish_reason=finish_reason(reply.finish_reason),
        usage=usage(reply.usage),
        model=reply.model,
        tokens=token_logprobs(reply.tokens),
    )


def decode_float32(data: bytes) -> list[float]:
    """Little-endian float32 bytes (the BASE64 encoding format) as floats."""
    values = array("f")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def embeddings(reply: embedding_pb2.EmbedResponse) -> Embeddings:
    ordered = sorted(reply.data, key=lambda item: item.index)
    vectors = [
        list(item.embedding) if item.embedding else decode_float32(item.embedding_bytes) for item in ordered
    ]
    return Embeddings(
        vectors=vectors,
        model=reply.model,
        dimensions=reply.dimensions,
        prompt_tokens=reply.usage.prompt_tokens,
        total_tokens=reply.usage.total_tokens,
    )


def _serving(value: info_pb2.ServingStatus.ValueType) -> ServingStatus:
    return {
        info_pb2.SERVING_STATUS_SERVING: ServingStatus.SERVING,
        info_pb2.SERVING_STATUS_NOT_SERVING: ServingStatus.NOT_SERVING,
    }.get(value, ServingStatus.UNSPECIFIED)


def health(reply: info_pb2.GetHealthResponse) -> Health:
    return Health(
        status=_serving(reply.status),
        components=tuple(
            ComponentHealth(
                component=item.component,
                address=item.address,
                status=_serving(item.status),
                device=DeviceInfo(item.device.type, item.device.name, item.device.count),
                memory=MemoryInfo(
                    process_rss_mib=item.memory.process_rss_mib,
                    system_total_mib=item.memory.system_total_mib,
                    system_available_mib=item.memory.system_available_mib,
                    gpu_allocated_mib=item.memory.gpu_allocated_mib,
                    gpu_total_mib=item.memory.gpu_total_mib,
                ),
                models=tuple(item.models),
                uptime_seconds=item.uptime_seconds,
                message=item.message,
            )
            for item in reply.components
        ),
    )


def models(reply: info_pb2.ListServedModelsResponse) -> list[Model]:
    return [
        Model(
            id=item.id,
            task=item.task,
            source=item.source,
            dtype=item.dtype,
            device=item.device,
            max_sequence_length=item.max_sequence_length,
            dimensions=item.dimensions,
            loaded=item.loaded,
        )
        for item in reply.models
    ]


def stats(reply: info_pb2.GetStatsResponse) -> list[ComponentStats]:
    return [
        ComponentStats(
            component=item.component,
            address=item.address,
            uptime_seconds=item.uptime_seconds,
            requests_total=item.requests_total,
            requests_failed=item.requests_failed,
            requests_running=item.requests_running,
            requests_waiting=item.requests_waiting,
            prompt_tokens_total=item.prompt_tokens_total,
            generated_tokens_total=item.generated_tokens_total,
            embedded_inputs_total=item.embedded_inputs_total,
            mean_time_to_first_token_seconds=item.mean_time_to_first_token_seconds,
            mean_tokens_per_second=item.mean_tokens_per_second,
            mean_batch_size=item.mean_batch_size,
            cache_hits=item.cache_hits,
        )
        for item in reply.components
    ]


def cache_status(reply: embedding_pb2.GetCacheStatusResponse) -> CacheStatus:
    return CacheStatus(
        strategy=reply.strategy,
        max_models=reply.max_models,
        memory_budget_mib=reply.memory_budget_mib,
        memory_used_mib=reply.memory_used_mib,
        models=tuple(
            CachedModel(
                name=item.name,
                size_mib=item.size_mib,
                device=item.device,
                dimensions=item.dimensions,
                max_seq_length=item.max_seq_length,
                hits=item.hits,
                loaded_at=item.loaded_at,
                last_used_at=item.last_used_at,
            )
            for item in reply.models
        ),
        loading=tuple(reply.loading),
        evictions=reply.evictions,
    )


class StreamState:
    """What a token stream has delivered so far: the text per sequence and, once the last
    messages arrived, each sequence's summary and the request's usage."""

    def __init__(self) -> None:
        self.request_id = ""
        self.texts: dict[int, list[str]] = {}
        self.summaries: dict[int, StreamSummary] = {}
        self.usage: Usage | None = None
        self.done = False
        self.prompt_tokens: tuple[TokenLogprob, ...] = ()
        """The prompt's tokens with their logprobs (first message, with prompt_logprobs)."""

    def feed(self, message: generation_pb2.GenerateStreamResponse) -> StreamToken | None:
        self.request_id = self.request_id or message.request_id
        if len(message.prompt_tokens):
            self.prompt_tokens = token_logprobs(message.prompt_tokens, prompt=True)
        token: StreamToken | None = None
        if message.HasField("token"):
            token = StreamToken(
                text=message.token.text,
                id=message.token.id,
                logprob=message.token.logprob,
                special=message.token.special,
                index=message.index,
                top_logprobs=_top(message.token.top_logprobs),
            )
            self.texts.setdefault(message.index, []).append(token.text)
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.summaries[message.index] = StreamSummary(
                index=message.index,
                text=message.generated_text,
                tokens_generated=message.tokens_generated,
                generation_time=message.generation_time,
                tokens_per_second=message.tokens_per_second,
                finish_reason=finish_reason(message.finish_reason),
                answer=message.answer if message.HasField("answer") else None,
                code=message.code if message.HasField("code") else None,
                language=message.language if message.HasField("language") else None,
            )
        if message.HasField("usage"):
            self.usage = usage(message.usage)
        return token

    def text(self, index: int = 0) -> str:
        return "".join(self.texts.get(index, ()))

    def finish_reason(self, index: int = 0) -> FinishReason | None:
        summary = self.summaries.get(index)
        return summary.finish_reason if summary else None
