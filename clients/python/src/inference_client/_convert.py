"""Protobuf at the edge: request messages from Python arguments, dataclasses from replies. Shared
by the sync and asyncio clients so that both behave the same."""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.parse
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, info_pb2, predictions_pb2

from inference_client.options import CONSTRAINTS, ChatOptions, GenerateOptions, JsonSchema
from inference_client.types import (
    CachedModel,
    CacheStatus,
    ChatMessage,
    ChatReply,
    ComponentHealth,
    ComponentStats,
    Deployment,
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
    Prediction,
    PredictionMetrics,
    PredictionPage,
    PredictionStatus,
    PredictionUrls,
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
    # json_object=False asks for nothing, so it is no second constraint.
    given = [name for name in CONSTRAINTS if name in options and options[name] is not False]  # type: ignore[literal-required]
    if len(given) > 1:
        raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
    if "json_schema" in options:
        json_format.ParseDict(dict(_schema_dict(options["json_schema"])), parameters.json_schema)
    if "json_object" in options:
        parameters.json_object = options["json_object"]
    if "regex" in options:
        parameters.regex = options["regex"]
    if "choice" in options:
        choices = options["choice"]
        if isinstance(choices, str):  # a string is a sequence of characters, never meant as choices
            raise TypeError("choice takes a list of strings, not one string")
        parameters.choice.extend(list(choices))
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


def _struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if values is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct


def create_prediction_request(
    model: str,
    input: Mapping[str, Any],
    version: str | None,
    webhook: str | None,
    webhook_events_filter: Sequence[str] | None,
) -> predictions_pb2.CreatePredictionRequest:
    return predictions_pb2.CreatePredictionRequest(
        model=model,
        version=version or "",
        input=_struct(input),
        webhook=webhook or "",
        webhook_events_filter=list(webhook_events_filter or ()),
    )


def wait_metadata(wait: float | None) -> tuple[tuple[str, str], ...]:
    """Replicate's `Prefer: wait=N` (whole seconds, at least 1) as gRPC metadata."""
    if wait is None:
        return ()
    return (("prefer", f"wait={max(1, round(wait))}"),)


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


def _json(value: Any) -> Any:
    """A Struct's contents as REST's JSON reads: protobuf keeps every number as a double, so a
    whole number comes back as an int (3, not 3.0), as json.loads gives it."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json(item) for item in value]
    return value


def _dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    converted: dict[str, Any] = _json(json_format.MessageToDict(struct))
    return converted


def prediction(reply: predictions_pb2.Prediction) -> Prediction:
    metrics = reply.metrics
    return Prediction(
        id=reply.id,
        model=reply.model,
        version=reply.version,
        status=cast(PredictionStatus, reply.status),
        input=_dict(reply.input),
        output=_json(json_format.MessageToDict(reply.output)) if reply.HasField("output") else None,
        error=reply.error,
        logs=reply.logs,
        created_at=_time(reply, "created_at") or datetime.fromtimestamp(0, UTC),
        started_at=_time(reply, "started_at"),
        completed_at=_time(reply, "completed_at"),
        metrics=PredictionMetrics(
            predict_time=metrics.predict_time,
            total_time=metrics.total_time,
            input_token_count=metrics.input_token_count,
            output_token_count=metrics.output_token_count,
            time_to_first_token=metrics.time_to_first_token,
        ),
        urls=PredictionUrls(get=reply.urls.get, cancel=reply.urls.cancel, stream=reply.urls.stream),
        task=reply.task,
        webhook=reply.webhook,
        webhook_events_filter=tuple(reply.webhook_events_filter),
    )


def cursor_of(link: str) -> str | None:
    """The cursor in a page link: its `cursor` query parameter (the link itself when it is a bare
    cursor); None for no page."""
    if not link:
        return None
    if "?" not in link:
        return link
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query).get("cursor")
    return values[0] if values else None


def prediction_page(reply: predictions_pb2.ListPredictionsResponse) -> PredictionPage:
    return PredictionPage(
        results=tuple(prediction(item) for item in reply.results),
        next_cursor=cursor_of(reply.next),
        previous_cursor=cursor_of(reply.previous),
        next=reply.next,
        previous=reply.previous,
    )


def list_predictions_request(
    status: str | None, cursor: str | None, page_size: int | None
) -> predictions_pb2.ListPredictionsRequest:
    return predictions_pb2.ListPredictionsRequest(
        status=status or "", cursor=cursor or "", page_size=page_size or 0
    )


def deployment_message(
    name: str,
    model: str,
    task: str,
    version: str,
    defaults: Mapping[str, Any] | None,
    input_schema: Mapping[str, Any] | None,
    description: str,
) -> predictions_pb2.Deployment:
    return predictions_pb2.Deployment(
        name=name,
        model=model,
        task=task,
        version=version,
        defaults=_struct(defaults),
        input_schema=_struct(input_schema),
        description=description,
    )


def update_deployment_request(
    name: str,
    model: str | None,
    task: str | None,
    version: str | None,
    defaults: Mapping[str, Any] | None,
    input_schema: Mapping[str, Any] | None,
    description: str | None,
) -> predictions_pb2.UpdateDeploymentRequest:
    """Only the fields given (not None) change."""
    return predictions_pb2.UpdateDeploymentRequest(
        name=name,
        model=model,
        task=task,
        version=version,
        defaults=_struct(defaults),
        input_schema=_struct(input_schema),
        description=description,
    )


def deployment(reply: predictions_pb2.Deployment) -> Deployment:
    return Deployment(
        name=reply.name,
        model=reply.model,
        task=reply.task,
        version=reply.version,
        defaults=_dict(reply.defaults),
        input_schema=_dict(reply.input_schema) if reply.HasField("input_schema") else None,
        description=reply.description,
        created_at=_time(reply, "created_at"),
        updated_at=_time(reply, "updated_at"),
    )
