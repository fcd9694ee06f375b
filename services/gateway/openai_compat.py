"""OpenAI request and response shapes to and from the native generation and embedding messages,
and the server-sent-event rendering of streamed chunks. Pure conversion: no I/O."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, openai_pb2

from services.common import sampling
from services.common.sse import sse_event
from services.gateway import tools
from services.gateway.tools import NO_TOOLS, ToolCall, ToolPlan

COMPLETION_DEFAULT_MAX_TOKENS = 16
OWNER = "inference-stack"


def finish_reason(reason: int) -> str:
    """OpenAI's name of a native finish reason: a completed constraint is a plain "stop"."""
    return "length" if reason == common_pb2.FINISH_REASON_LENGTH else "stop"


@dataclass(frozen=True)
class ChatPlan:
    """A checked chat request: its (role, text) turns and how it uses its tools."""

    turns: tuple[tuple[str, str], ...]
    tools: ToolPlan = NO_TOOLS


OpenAIGeneration = openai_pb2.CreateChatCompletionRequest | openai_pb2.CreateCompletionRequest


def max_tokens_field(request: OpenAIGeneration) -> str:
    """The OpenAI field that gives max_new_tokens: chat prefers max_completion_tokens."""
    if isinstance(request, openai_pb2.CreateChatCompletionRequest) and request.HasField(
        "max_completion_tokens"
    ):
        return "max_completion_tokens"
    return "max_tokens"


def sent_max_tokens(request: OpenAIGeneration) -> int | None:
    """The token limit the client sent, from the field max_tokens_field names; None if absent."""
    if isinstance(request, openai_pb2.CreateChatCompletionRequest) and request.HasField(
        "max_completion_tokens"
    ):
        return request.max_completion_tokens
    return request.max_tokens if request.HasField("max_tokens") else None


def sampling_parameters(request: OpenAIGeneration) -> common_pb2.SamplingParameters:
    """The native knobs of an OpenAI request: the one place its flat fields are read. OpenAI
    samples (at temperature 1) unless told otherwise, and temperature 0 is greedy."""
    parameters = common_pb2.SamplingParameters(do_sample=True)
    max_tokens = sent_max_tokens(request)
    if max_tokens is not None:
        parameters.max_new_tokens = max_tokens
    elif isinstance(request, openai_pb2.CreateCompletionRequest):
        parameters.max_new_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    if request.HasField("temperature"):
        parameters.temperature = request.temperature
    if request.HasField("top_p"):
        parameters.top_p = request.top_p
    if request.HasField("top_k"):
        parameters.top_k = request.top_k
    if request.HasField("repetition_penalty"):
        parameters.repetition_penalty = request.repetition_penalty
    if request.HasField("seed"):
        parameters.seed = request.seed
    if request.HasField("n"):
        parameters.num_return_sequences = request.n
    if request.HasField("presence_penalty"):
        parameters.presence_penalty = request.presence_penalty
    if request.HasField("frequency_penalty"):
        parameters.frequency_penalty = request.frequency_penalty
    parameters.logit_bias.update(request.logit_bias)
    if request.stop.WhichOneof("kind") not in (None, "null_value"):
        parameters.stop.CopyFrom(request.stop)
    _logprob_parameters(request, parameters)
    _response_format(request, parameters)
    return parameters


# The OpenAI field each native constraint of response_format comes from.
RESPONSE_FORMAT_FIELDS = {
    "json_schema": "response_format.json_schema.schema",
    "json_object": "response_format",
}


def constraint_source(request: OpenAIGeneration, tools: ToolPlan = NO_TOOLS) -> dict[str, str]:
    """The native constraint field this request fills, to the OpenAI field it came from."""
    if tools.forced:
        return {f"{sampling.FIELD}.json_schema": "tools"}
    if request.response_format.type == "json_schema":
        return {f"{sampling.FIELD}.json_schema": RESPONSE_FORMAT_FIELDS["json_schema"]}
    return {}


def _response_format(request: OpenAIGeneration, parameters: common_pb2.SamplingParameters) -> None:
    """response_format as the native constraint: json_object, or json_schema's schema."""
    kind = request.response_format.type
    if kind == "json_object":
        parameters.json_object = True
    elif kind == "json_schema" and request.response_format.json_schema.HasField("schema"):
        parameters.json_schema.CopyFrom(request.response_format.json_schema.schema)


def _logprob_parameters(request: OpenAIGeneration, parameters: common_pb2.SamplingParameters) -> None:
    """Chat's logprobs and top_logprobs as they are; completions' logprobs N as logprobs with N
    alternatives, and with echo the prompt's logprobs too."""
    if isinstance(request, openai_pb2.CreateChatCompletionRequest):
        if request.HasField("logprobs"):
            parameters.logprobs = request.logprobs
        if request.HasField("top_logprobs"):
            parameters.top_logprobs = request.top_logprobs
    elif request.HasField("logprobs"):
        parameters.logprobs = True
        parameters.top_logprobs = request.logprobs
        if request.echo:
            parameters.prompt_logprobs = True


def wants_logprobs(request: OpenAIGeneration) -> bool:
    """Whether the reply carries logprobs: chat's logprobs true, or completions' logprobs set."""
    if isinstance(request, openai_pb2.CreateChatCompletionRequest):
        return request.logprobs
    return request.HasField("logprobs")


def _chat_entry(token: common_pb2.Token) -> openai_pb2.ChatCompletionTokenLogprob:
    return openai_pb2.ChatCompletionTokenLogprob(
        token=token.piece,
        logprob=token.logprob,
        bytes=list(token.piece_bytes),
        top_logprobs=[
            openai_pb2.ChatCompletionTopLogprob(token=top.text, logprob=top.logprob, bytes=list(top.bytes))
            for top in token.top_logprobs
        ],
    )


def chat_logprobs(tokens: Iterable[common_pb2.Token]) -> openai_pb2.ChatCompletionLogprobs:
    """OpenAI's chat logprobs of the content's tokens (special tokens such as EOS are not content)."""
    return openai_pb2.ChatCompletionLogprobs(
        content=[_chat_entry(token) for token in tokens if not token.special]
    )


class CompletionLogprobsBuilder:
    """OpenAI's legacy completions logprobs: parallel lists, the offsets counted in the choice's
    text across calls. Each top_logprobs object holds the chosen token too, as OpenAI's do."""

    def __init__(self) -> None:
        self.offset = 0

    def build(
        self, tokens: Iterable[common_pb2.Token], first_is_prompt_start: bool = False
    ) -> openai_pb2.CompletionLogprobs:
        result = openai_pb2.CompletionLogprobs()
        for number, token in enumerate(tokens):
            if token.special:
                continue
            result.tokens.append(token.piece)
            result.text_offset.append(self.offset)
            self.offset += len(token.piece)
            if number == 0 and first_is_prompt_start:
                result.token_logprobs.values.add().null_value = struct_pb2.NULL_VALUE
                result.top_logprobs.values.add().null_value = struct_pb2.NULL_VALUE
                continue
            result.token_logprobs.values.add().number_value = token.logprob
            top = result.top_logprobs.values.add().struct_value
            for alternative in token.top_logprobs:
                top.fields[alternative.text].number_value = alternative.logprob
            top.fields[token.piece].number_value = token.logprob
        return result


def chat_fields(
    request: openai_pb2.CreateChatCompletionRequest, plan: ChatPlan, model: str
) -> dict[str, Any]:
    """The native request's fields. A forced tool call gets the tools described in a first
    system message and the reply constrained to the calls' JSON Schema."""
    turns = list(plan.turns)
    parameters = sampling_parameters(request)
    if plan.tools.forced:
        # Into the first system message when there is one: some templates take only one.
        described = tools.system_prompt(plan.tools)
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{described}\n\n{turns[0][1]}")
        else:
            turns.insert(0, ("system", described))
        json_format.ParseDict(tools.call_schema(plan.tools), parameters.json_schema)
    return {
        "messages": [common_pb2.ChatMessage(role=role, content=text) for role, text in turns],
        "model": model,
        "parameters": parameters,
    }


def chat_request(
    request: openai_pb2.CreateChatCompletionRequest, plan: ChatPlan, model: str
) -> generation_pb2.ChatRequest:
    """The native Chat request of tool_choice "auto": the tools go to the model's chat template."""
    native = generation_pb2.ChatRequest(**chat_fields(request, plan, model))
    for tool in plan.tools.tools:
        json_format.ParseDict(tool.openai(), native.tools.add())
    return native


def generation_of_chat(reply: generation_pb2.ChatResponse) -> generation_pb2.GenerateResponse:
    """A Chat reply in Generate's shape, so that one conversion serves both."""
    return generation_pb2.GenerateResponse(
        request_id=reply.request_id,
        generated_text=reply.message.content,
        tokens_generated=reply.tokens_generated,
        finish_reason=reply.finish_reason,
        usage=reply.usage,
        model=reply.model,
        tokens=reply.tokens,
        sequences=[
            common_pb2.GeneratedSequence(
                index=0,
                text=reply.message.content,
                tokens_generated=reply.tokens_generated,
                finish_reason=reply.finish_reason,
                tokens=reply.tokens,
            )
        ],
    )


def reply_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """The content and the tool calls of a reply: a forced reply is one call (its text stays the
    content when it is not one, cut short by max_tokens); a templated one may hold Hermes blocks."""
    if plan.forced:
        call = tools.parse_forced(text, plan)
        return (text, []) if call is None else (None, [call])
    if plan.templated:
        return tools.parse_hermes(text)
    return text, []


def tool_call_messages(calls: Iterable[ToolCall]) -> list[openai_pb2.ChatCompletionMessageToolCall]:
    return [
        openai_pb2.ChatCompletionMessageToolCall(
            id=call.id,
            type="function",
            function=openai_pb2.ChatCompletionFunctionCall(name=call.name, arguments=call.arguments),
        )
        for call in calls
    ]


def completion_fields(request: openai_pb2.CreateCompletionRequest, prompt: str, model: str) -> dict[str, Any]:
    return {"prompt": prompt, "model": model, "parameters": sampling_parameters(request)}


def _sequences(response: generation_pb2.GenerateResponse) -> list[common_pb2.GeneratedSequence]:
    if len(response.sequences) > 0:
        return list(response.sequences)
    return [
        common_pb2.GeneratedSequence(
            index=0,
            text=response.generated_text,
            tokens_generated=response.tokens_generated,
            finish_reason=response.finish_reason,
        )
    ]


def usage(total: Iterable[common_pb2.Usage]) -> openai_pb2.CompletionUsage:
    result = openai_pb2.CompletionUsage()
    for item in total:
        result.prompt_tokens += item.prompt_tokens
        result.completion_tokens += item.completion_tokens
        result.total_tokens += item.total_tokens
    return result


def _chat_choice(
    sequence: common_pb2.GeneratedSequence, plan: ToolPlan, logprobs: bool
) -> openai_pb2.ChatCompletionChoice:
    content, calls = reply_calls(sequence.text, plan)
    message = openai_pb2.ChatCompletionResponseMessage(role="assistant", tool_calls=tool_call_messages(calls))
    if content is not None:
        message.content = content
    return openai_pb2.ChatCompletionChoice(
        index=sequence.index,
        message=message,
        finish_reason="tool_calls" if calls else finish_reason(sequence.finish_reason),
        logprobs=chat_logprobs(sequence.tokens) if logprobs else None,
    )


def chat_response(
    response: generation_pb2.GenerateResponse, model: str, logprobs: bool = False, plan: ToolPlan = NO_TOOLS
) -> openai_pb2.CreateChatCompletionResponse:
    return openai_pb2.CreateChatCompletionResponse(
        id=f"chatcmpl-{response.request_id}",
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[_chat_choice(sequence, plan, logprobs) for sequence in _sequences(response)],
        usage=usage([response.usage]),
        system_fingerprint=f"fp-{model}",
    )


def completion_response(
    responses: list[generation_pb2.GenerateResponse],
    prompts: list[str],
    echo: bool,
    model: str,
    logprobs: bool = False,
) -> openai_pb2.CreateCompletionResponse:
    choices = []
    for number, (response, prompt) in enumerate(zip(responses, prompts, strict=True)):
        sequences = _sequences(response)
        for sequence in sequences:
            choice = openai_pb2.CompletionChoice(
                index=number * len(sequences) + sequence.index,
                text=(prompt if echo else "") + sequence.text,
                finish_reason=finish_reason(sequence.finish_reason),
            )
            if logprobs:
                tokens = [*(response.prompt_tokens if echo else []), *sequence.tokens]
                built = CompletionLogprobsBuilder().build(tokens, first_is_prompt_start=echo)
                choice.logprobs.CopyFrom(built)
            choices.append(choice)
    request_id = responses[0].request_id if responses else ""
    return openai_pb2.CreateCompletionResponse(
        id=f"cmpl-{request_id}",
        object="text_completion",
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=usage(response.usage for response in responses),
        system_fingerprint=f"fp-{model}",
    )


class ChatChunker:
    """Turns native stream messages into chat.completion.chunk messages. A forced tool call is
    held until the reply ends and then sent whole, as OpenAI's deltas (the call's id, type and
    name with empty arguments, then the arguments); a templated reply streams its content and
    holds back what may be a <tool_call> block."""

    def __init__(
        self, model: str, include_usage: bool, logprobs: bool = False, plan: ToolPlan = NO_TOOLS
    ) -> None:
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.plan = plan
        self.created = int(time.time())
        self.id = ""
        self._started: set[int] = set()
        self._usage: list[common_pb2.Usage] = []
        # Tokens whose text has not been sent yet (part of a character or of a possible stop).
        self._pending: dict[int, list[common_pb2.Token]] = {}
        self._held: dict[int, str] = {}
        self._splitters: dict[int, tools.HermesSplitter] = {}

    def _chunk(
        self, choices: list[openai_pb2.ChatCompletionChunkChoice]
    ) -> openai_pb2.StreamChatCompletionResponse:
        return openai_pb2.StreamChatCompletionResponse(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=choices,
        )

    def _content(
        self, index: int, text: str, pending: list[common_pb2.Token]
    ) -> openai_pb2.StreamChatCompletionResponse:
        choice = openai_pb2.ChatCompletionChunkChoice(
            index=index, delta=openai_pb2.ChatCompletionDelta(content=text)
        )
        if self.logprobs:
            choice.logprobs.CopyFrom(chat_logprobs(pending))
            pending.clear()
        return self._chunk([choice])

    def _calls(self, index: int, calls: list[ToolCall]) -> list[openai_pb2.StreamChatCompletionResponse]:
        chunks = []
        for number, call in enumerate(calls):
            head = openai_pb2.ChatCompletionToolCallDelta(
                index=number,
                id=call.id,
                type="function",
                function=openai_pb2.ChatCompletionFunctionCall(name=call.name, arguments=""),
            )
            body = openai_pb2.ChatCompletionToolCallDelta(
                index=number, function=openai_pb2.ChatCompletionFunctionCall(arguments=call.arguments)
            )
            for part in (head, body):
                delta = openai_pb2.ChatCompletionDelta(tool_calls=[part])
                chunks.append(self._chunk([openai_pb2.ChatCompletionChunkChoice(index=index, delta=delta)]))
        return chunks

    def _text(
        self, index: int, text: str, pending: list[common_pb2.Token]
    ) -> list[openai_pb2.StreamChatCompletionResponse]:
        if self.plan.forced:
            self._held[index] = self._held.get(index, "") + text
            return []
        if self.plan.templated:
            text = self._splitters.setdefault(index, tools.HermesSplitter()).feed(text)
        return [self._content(index, text, pending)] if text else []

    def _ending(
        self, index: int, pending: list[common_pb2.Token]
    ) -> tuple[list[openai_pb2.StreamChatCompletionResponse], bool]:
        """The chunks of what was held back, and whether they are tool calls."""
        content: str | None = ""
        calls: list[ToolCall] = []
        if self.plan.forced:
            content, calls = reply_calls(self._held.pop(index, ""), self.plan)
        elif self.plan.templated:
            content, calls = self._splitters.setdefault(index, tools.HermesSplitter()).finish()
        chunks = [self._content(index, content, pending)] if content else []
        return chunks + self._calls(index, calls), bool(calls)

    def feed(
        self, message: generation_pb2.GenerateStreamResponse
    ) -> list[openai_pb2.StreamChatCompletionResponse]:
        if not self.id:
            self.id = f"chatcmpl-{message.request_id}"
        chunks = []
        index = message.index
        if index not in self._started:
            self._started.add(index)
            delta = openai_pb2.ChatCompletionDelta(role="assistant", content="")
            chunks.append(self._chunk([openai_pb2.ChatCompletionChunkChoice(index=index, delta=delta)]))
        pending = self._pending.setdefault(index, [])
        if self.logprobs and message.HasField("token") and not message.token.special:
            pending.append(message.token)
        if message.token.text:
            chunks.extend(self._text(index, message.token.text, pending))
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            ending, called = self._ending(index, pending)
            chunks.extend(ending)
            choice = openai_pb2.ChatCompletionChunkChoice(
                index=index,
                delta=openai_pb2.ChatCompletionDelta(),
                finish_reason="tool_calls" if called else finish_reason(message.finish_reason),
            )
            if pending:
                choice.logprobs.CopyFrom(chat_logprobs(pending))
                pending.clear()
            chunks.append(self._chunk([choice]))
        if message.HasField("usage"):
            self._usage.append(message.usage)
        return chunks

    def finish(self) -> list[openai_pb2.StreamChatCompletionResponse]:
        if not self.include_usage:
            return []
        last = self._chunk([])
        last.usage.CopyFrom(usage(self._usage))
        return [last]


class CompletionChunker:
    """Turns native stream messages of one or more prompts into text_completion chunks."""

    def __init__(self, model: str, include_usage: bool, echo: bool, logprobs: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.echo = echo
        self.logprobs = logprobs
        self.created = int(time.time())
        self.id = ""
        self._started: set[int] = set()
        self._usage: list[common_pb2.Usage] = []
        self._pending: dict[int, list[common_pb2.Token]] = {}
        self._builders: dict[int, CompletionLogprobsBuilder] = {}
        # The prompt's tokens, from the first message of each prompt's stream (echo with logprobs).
        self._prompt_tokens: dict[int, list[common_pb2.Token]] = {}

    def _chunk(self, choices: list[openai_pb2.CompletionChoice]) -> openai_pb2.StreamCompletionResponse:
        return openai_pb2.StreamCompletionResponse(
            id=self.id, object="text_completion", created=self.created, model=self.model, choices=choices
        )

    def feed(
        self, message: generation_pb2.GenerateStreamResponse, prompt: str, offset: int
    ) -> list[openai_pb2.StreamCompletionResponse]:
        if not self.id:
            self.id = f"cmpl-{message.request_id}"
        index = offset + message.index
        chunks = []
        text = message.token.text
        if len(message.prompt_tokens):
            self._prompt_tokens[offset] = list(message.prompt_tokens)
        pending = self._pending.setdefault(index, [])
        echoed = False
        if index not in self._started:
            self._started.add(index)
            if self.echo:
                text = prompt + text
                echoed = self.logprobs
                pending.extend(self._prompt_tokens.get(offset, []))
        if self.logprobs and message.HasField("token") and not message.token.special:
            pending.append(message.token)
        if text:
            choice = openai_pb2.CompletionChoice(index=index, text=text)
            self._attach(choice, pending, echoed)
            chunks.append(self._chunk([choice]))
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            choice = openai_pb2.CompletionChoice(
                index=index, finish_reason=finish_reason(message.finish_reason)
            )
            self._attach(choice, pending, False)
            chunks.append(self._chunk([choice]))
        if message.HasField("usage"):
            self._usage.append(message.usage)
        return chunks

    def _attach(
        self, choice: openai_pb2.CompletionChoice, pending: list[common_pb2.Token], echoed: bool
    ) -> None:
        if not self.logprobs or not pending:
            return
        builder = self._builders.setdefault(choice.index, CompletionLogprobsBuilder())
        choice.logprobs.CopyFrom(builder.build(pending, first_is_prompt_start=echoed))
        pending.clear()

    def finish(self) -> list[openai_pb2.StreamCompletionResponse]:
        if not self.include_usage:
            return []
        last = self._chunk([])
        last.usage.CopyFrom(usage(self._usage))
        return [last]


def _usage_json(value: openai_pb2.CompletionUsage) -> dict[str, int]:
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.total_tokens,
    }


def chat_logprobs_json(value: openai_pb2.ChatCompletionLogprobs) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": list(entry.bytes),
                "top_logprobs": [
                    {"token": top.token, "logprob": top.logprob, "bytes": list(top.bytes)}
                    for top in entry.top_logprobs
                ],
            }
            for entry in value.content
        ]
    }


def completion_logprobs_json(value: openai_pb2.CompletionLogprobs) -> dict[str, Any]:
    return {
        "tokens": list(value.tokens),
        "token_logprobs": json_format.MessageToDict(value.token_logprobs),
        "top_logprobs": json_format.MessageToDict(value.top_logprobs),
        "text_offset": list(value.text_offset),
    }


def _completion_logprobs_or_none(choice: openai_pb2.CompletionChoice) -> dict[str, Any] | None:
    return completion_logprobs_json(choice.logprobs) if choice.HasField("logprobs") else None


def _tool_call_delta_json(part: openai_pb2.ChatCompletionToolCallDelta) -> dict[str, Any]:
    """A call's first delta has its id, type and name; later ones only add to the arguments."""
    body: dict[str, Any] = {"index": part.index}
    if part.id:
        body["id"] = part.id
        body["type"] = part.type
        body["function"] = {"name": part.function.name, "arguments": part.function.arguments}
    else:
        body["function"] = {"arguments": part.function.arguments}
    return body


def chat_chunk_json(chunk: openai_pb2.StreamChatCompletionResponse) -> dict[str, Any]:
    choices = []
    for choice in chunk.choices:
        delta: dict[str, Any] = {}
        if choice.delta.role:
            delta["role"] = choice.delta.role
            delta["content"] = choice.delta.content
        elif choice.delta.content:
            delta["content"] = choice.delta.content
        if len(choice.delta.tool_calls):
            delta["tool_calls"] = [_tool_call_delta_json(part) for part in choice.delta.tool_calls]
        choices.append(
            {
                "index": choice.index,
                "delta": delta,
                "logprobs": chat_logprobs_json(choice.logprobs) if choice.HasField("logprobs") else None,
                "finish_reason": choice.finish_reason or None,
            }
        )
    body: dict[str, Any] = {
        "id": chunk.id,
        "object": chunk.object,
        "created": chunk.created,
        "model": chunk.model,
        "choices": choices,
    }
    if chunk.HasField("usage"):
        body["usage"] = _usage_json(chunk.usage)
    return body


def completion_chunk_json(chunk: openai_pb2.StreamCompletionResponse) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": chunk.id,
        "object": chunk.object,
        "created": chunk.created,
        "model": chunk.model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": _completion_logprobs_or_none(choice),
                "finish_reason": choice.finish_reason or None,
            }
            for choice in chunk.choices
        ],
    }
    if chunk.HasField("usage"):
        body["usage"] = _usage_json(chunk.usage)
    return body


def sse_error(message: str, kind: str, code: int, status: str) -> bytes:
    """An in-band error event in OpenAI's shape; the official SDKs raise it as an APIError."""
    return sse_event(
        {"error": {"message": message, "type": kind, "param": None, "code": code, "status": status}}
    )


def embedding_request(request: openai_pb2.CreateEmbeddingRequest, model: str) -> embedding_pb2.EmbedRequest:
    native = embedding_pb2.EmbedRequest(
        model=model,
        encoding_format=embedding_pb2.ENCODING_FORMAT_BASE64
        if request.encoding_format == "base64"
        else embedding_pb2.ENCODING_FORMAT_FLOAT,
    )
    native.input.CopyFrom(request.input)
    if request.HasField("dimensions"):
        native.dimensions = request.dimensions
    return native


def embedding_response(
    response: embedding_pb2.EmbedResponse, encoding_format: str, model: str
) -> openai_pb2.CreateEmbeddingResponse:
    data = []
    for item in response.data:
        value = struct_pb2.Value()
        if encoding_format == "base64":
            raw = item.embedding_bytes or struct.pack(f"<{len(item.embedding)}f", *item.embedding)
            value.string_value = base64.b64encode(raw).decode()
        else:
            floats = list(item.embedding) or list(
                struct.unpack(f"<{len(item.embedding_bytes) // 4}f", item.embedding_bytes)
            )
            value.list_value.values.extend(struct_pb2.Value(number_value=number) for number in floats)
        data.append(openai_pb2.EmbeddingData(object="embedding", index=item.index, embedding=value))
    return openai_pb2.CreateEmbeddingResponse(
        object="list",
        data=data,
        model=model or response.model,
        usage=openai_pb2.EmbeddingUsageInfo(
            prompt_tokens=response.usage.prompt_tokens, total_tokens=response.usage.total_tokens
        ),
    )
