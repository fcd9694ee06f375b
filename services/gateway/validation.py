"""Checks of every request before any backend work: sizes, ranges, roles and types, each
violation naming its field and the limit (INVALID_ARGUMENT with a BadRequest detail)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, openai_pb2

from services.common import sampling
from services.common.sampling import DEFAULT_LIMITS, SamplingLimits
from services.gateway import openai_compat, tools
from services.gateway.errors import invalid_argument

NATIVE_ROLES = ("system", "user", "assistant", "tool")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_TOKEN_ID = 2**31 - 1
# OpenAI's own range of temperature; every other knob's range is sampling.DEFAULT_LIMITS'.
OPENAI_MAX_TEMPERATURE = 2.0
# OpenAI's legacy completions take at most 5 alternatives per token (chat's top_logprobs: 20).
OPENAI_COMPLETION_MAX_LOGPROBS = 5


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = 100_000
    max_messages: int = 256
    max_new_tokens: int = DEFAULT_LIMITS.max_new_tokens
    max_sequences: int = DEFAULT_LIMITS.max_num_return_sequences
    max_stop_sequences: int = DEFAULT_LIMITS.max_stop_sequences
    max_embedding_inputs: int = 2048

    @functools.cached_property
    def sampling(self) -> SamplingLimits:
        """The knobs' ranges with this gateway's counts."""
        return replace(
            DEFAULT_LIMITS,
            max_new_tokens=self.max_new_tokens,
            max_num_return_sequences=self.max_sequences,
            max_num_beams=self.max_sequences,
            max_stop_sequences=self.max_stop_sequences,
        )

    @functools.cached_property
    def openai_sampling(self) -> SamplingLimits:
        """The same, with OpenAI's own range of temperature."""
        return replace(self.sampling, max_temperature=OPENAI_MAX_TEMPERATURE)


class Violations:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, why: str) -> None:
        self.items.append((field, why))

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)

    def int_range(self, field: str, value: int | None, low: int, high: int) -> None:
        """Checks low <= value <= high; None (an absent field) passes."""
        if value is not None and not low <= value <= high:
            self.add(field, f"must be between {low} and {high}, got {value}")

    def float_range(self, field: str, value: float | None, low: float, high: float) -> None:
        """Checks low <= value <= high; None (an absent field) passes."""
        if value is not None and (not math.isfinite(value) or not low <= value <= high):
            self.add(field, f"must be in [{low:g}, {high:g}], got {value:g}")

    def text(self, field: str, value: str, limit: int, required: bool = True) -> None:
        if required and not value.strip():
            self.add(field, "must not be empty")
        elif len(value) > limit:
            self.add(field, f"is {len(value)} characters, more than the limit of {limit}")


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    if kind == "struct_value":
        return {key: _plain(item) for key, item in value.struct_value.fields.items()}
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


_JSON_TYPES = ("google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue")


def _non_finite(message: Message, prefix: str = "") -> list[str]:
    """The paths of the NaN and infinite numbers in every JSON field of `message`, at any depth."""
    found: list[str] = []
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        path = f"{prefix}{field.name}"
        items = list(enumerate(value)) if field.is_repeated else [(None, value)]
        for index, item in items:
            at = path if index is None else f"{path}[{index}]"
            if field.message_type.full_name in _JSON_TYPES:
                found.extend(sampling.non_finite(item, at))
            else:
                found.extend(_non_finite(item, f"{at}."))
    return found


def refuse_non_finite(request: Message) -> None:
    """Refuses NaN and infinities in the request's JSON fields before anything prints them as
    JSON (json_format raises on them); each one is named by its path."""
    out = Violations()
    for path in _non_finite(request):
        out.add(path, sampling.NON_FINITE)
    out.raise_if_any()


def _messages(
    messages: Iterable[common_pb2.ChatMessage | Any], limits: RequestLimits, out: Violations
) -> None:
    items = list(messages)
    if len(items) > limits.max_messages:
        out.add("messages", f"has {len(items)} messages, more than the limit of {limits.max_messages}")
    for index, message in enumerate(items):
        if message.role not in NATIVE_ROLES:
            out.add(
                f"messages[{index}].role", f"must be one of {', '.join(NATIVE_ROLES)}, got {message.role!r}"
            )
        out.text(f"messages[{index}].content", message.content, limits.max_prompt_chars, required=False)


def _sampling(parameters: common_pb2.SamplingParameters, limits: RequestLimits, out: Violations) -> None:
    for path, problem in sampling.violations(parameters, limits.sampling):
        out.add(path, problem)


def validate_generate(
    request: generation_pb2.GenerateRequest | generation_pb2.GenerateStreamRequest, limits: RequestLimits
) -> None:
    refuse_non_finite(request)
    out = Violations()
    if request.prompt and len(request.messages) > 0:
        out.add("prompt", "set either prompt or messages, not both")
    elif not request.prompt.strip() and len(request.messages) == 0:
        out.add("prompt", "must not be empty (or send messages)")
    else:
        out.text("prompt", request.prompt, limits.max_prompt_chars, required=False)
    _messages(request.messages, limits, out)
    _sampling(request.parameters, limits, out)
    out.raise_if_any()


def validate_chat(request: generation_pb2.ChatRequest, limits: RequestLimits) -> None:
    refuse_non_finite(request)
    out = Violations()
    if len(request.messages) == 0:
        out.add("messages", "must not be empty")
    _messages(request.messages, limits, out)
    for field, problem in tools.tool_violations([json_format.MessageToDict(t) for t in request.tools]):
        out.add(field, problem)
    _sampling(request.parameters, limits, out)
    out.raise_if_any()


def validate_solve(
    request: generation_pb2.SolveMathRequest | generation_pb2.SolveCodingRequest, limits: RequestLimits
) -> None:
    refuse_non_finite(request)
    out = Violations()
    out.text("problem", request.problem, limits.max_prompt_chars)
    if isinstance(request, generation_pb2.SolveCodingRequest) and len(request.language) > 32:
        out.add("language", "is longer than 32 characters")
    _sampling(request.parameters, limits, out)
    out.raise_if_any()


def embedding_inputs(value: struct_pb2.Value, field: str, limits: RequestLimits, out: Violations) -> int:
    """Checks a string / strings / token ids / lists of token ids Value; returns the input count."""
    data = _plain(value)
    if isinstance(data, str):
        out.text(field, data, limits.max_prompt_chars)
        return 1
    if not isinstance(data, list) or not data:
        out.add(
            field, "must be a non-empty string, list of strings, list of token ids or list of token-id lists"
        )
        return 0
    if all(isinstance(item, float) for item in data):
        _token_ids(data, field, out)
        return 1
    if len(data) > limits.max_embedding_inputs:
        out.add(field, f"has {len(data)} inputs, more than the limit of {limits.max_embedding_inputs}")
    for index, item in enumerate(data):
        if isinstance(item, str):
            out.text(f"{field}[{index}]", item, limits.max_prompt_chars)
        elif isinstance(item, list) and item and all(isinstance(token, float) for token in item):
            _token_ids(item, f"{field}[{index}]", out)
        else:
            out.add(f"{field}[{index}]", "must be a non-empty string or a non-empty list of token ids")
    return len(data)


def _token_ids(items: list[Any], field: str, out: Violations) -> None:
    for index, token in enumerate(items):
        if not (float(token).is_integer() and 0 <= token <= MAX_TOKEN_ID):
            out.add(f"{field}[{index}]", f"token ids are integers from 0 to {MAX_TOKEN_ID}, got {token!r}")
            return


def validate_embed(request: embedding_pb2.EmbedRequest, limits: RequestLimits) -> None:
    refuse_non_finite(request)
    out = Violations()
    embedding_inputs(request.input, "input", limits, out)
    out.int_range("dimensions", request.dimensions if request.HasField("dimensions") else None, 1, 65536)
    out.text("model", request.model, 512, required=False)
    out.raise_if_any()


def validate_model_names(models: Iterable[str], field: str) -> None:
    out = Violations()
    for index, name in enumerate(models):
        out.text(f"{field}[{index}]", name, 512)
    out.raise_if_any()


def openai_content(value: struct_pb2.Value, field: str, out: Violations) -> str:
    """The text of a message's content: a string or a list of text parts."""
    data = _plain(value)
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    if isinstance(data, list):
        texts = []
        for index, part in enumerate(data):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                out.add(f"{field}[{index}]", "only text parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(texts)
    out.add(field, "must be a string or a list of content parts")
    return ""


def _openai_sampling(
    request: openai_pb2.CreateChatCompletionRequest | openai_pb2.CreateCompletionRequest,
    limits: RequestLimits,
    out: Violations,
) -> None:
    """The native ranges of the knobs the request converts to (with OpenAI's own temperature
    range), under OpenAI's field names."""
    names = {
        "max_new_tokens": openai_compat.max_tokens_field(request),
        "num_return_sequences": "n",
        **openai_compat.RESPONSE_FORMAT_FIELDS,
    }
    parameters = openai_compat.sampling_parameters(request)
    if openai_compat.sent_max_tokens(request) is None:
        # The default the conversion fills in is the server's choice, not the client's to fix.
        parameters.ClearField("max_new_tokens")
    completion = isinstance(request, openai_pb2.CreateCompletionRequest)
    for path, problem in sampling.violations(parameters, limits.openai_sampling):
        knob, dot, rest = path.removeprefix(f"{sampling.FIELD}.").partition(".")
        if completion and knob == "top_logprobs":
            continue  # completions' own, narrower logprobs range is checked below
        out.add(names.get(knob, knob) + dot + rest, problem)
    if completion and request.HasField("logprobs"):
        out.int_range("logprobs", request.logprobs, 0, OPENAI_COMPLETION_MAX_LOGPROBS)
    if (
        isinstance(request, openai_pb2.CreateChatCompletionRequest)
        and request.HasField("top_logprobs")
        and request.top_logprobs > 0
        and not request.logprobs
    ):
        out.add("top_logprobs", "needs logprobs set to true")
    if not request.model.strip():
        out.add("model", "is required")


def _response_format(
    request: openai_pb2.CreateChatCompletionRequest | openai_pb2.CreateCompletionRequest, out: Violations
) -> None:
    if not request.HasField("response_format"):
        return
    kind = request.response_format.type
    if kind not in RESPONSE_FORMATS:
        out.add("response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    elif kind == "json_schema" and not request.response_format.json_schema.HasField("schema"):
        out.add("response_format.json_schema.schema", 'is required with type "json_schema"')


def _tool_plan(
    request: openai_pb2.CreateChatCompletionRequest, limits: RequestLimits, out: Violations
) -> tools.ToolPlan:
    """The request's tools and tool_choice resolved, each problem naming its field."""
    sent = [json_format.MessageToDict(tool, preserving_proto_field_name=True) for tool in request.tools]
    problems = tools.tool_violations(sent)
    for field, problem in problems:
        out.add(field, problem)
    choice_sent = request.HasField("tool_choice") and request.tool_choice.WhichOneof("kind") != "null_value"
    names = [str(tool.get("function", {}).get("name")) for tool in sent]
    choice = tools.choice_of(_plain(request.tool_choice) if choice_sent else None, names)
    if isinstance(choice, str):
        out.add("tool_choice", choice)
        return tools.ToolPlan()
    if problems:
        return tools.ToolPlan()
    plan = tools.ToolPlan(
        tuple(
            tools.Tool(
                tool.function.name,
                tool.function.description,
                json_format.MessageToDict(tool.function.parameters)
                if tool.function.HasField("parameters")
                else None,
            )
            for tool in request.tools
        ),
        choice,
    )
    if plan.forced:
        if request.HasField("response_format") and request.response_format.type not in ("", "text"):
            out.add(
                "response_format",
                f"cannot be combined with tool_choice {choice.mode!r}, which constrains the reply "
                "to a tool call (one constraint per request)",
            )
        size = len(sampling.canonical_json(tools.call_schema(plan)))
        if size > limits.sampling.max_constraint_length:
            out.add(
                "tools",
                f"the schema of the calls has {size} characters, more than the limit of "
                f"{limits.sampling.max_constraint_length}",
            )
    if plan.templated and request.HasField("n") and request.n > 1:
        out.add("n", 'must be 1 with tools under tool_choice "auto"')
    return plan


def _turn_text(
    message: openai_pb2.ChatCompletionMessage, index: int, plan: tools.ToolPlan, out: Violations
) -> str:
    """A message's text; an assistant's tool calls written as the model would write them."""
    text = openai_content(message.content, f"messages[{index}].content", out)
    if len(message.tool_calls) and message.role != "assistant":
        out.add(f"messages[{index}].tool_calls", "only assistant messages carry tool calls")
    write = tools.hermes_text if plan.templated else tools.call_text
    calls = [write(call.function.name, call.function.arguments) for call in message.tool_calls]
    return "\n".join(part for part in [text, *calls] if part)


def validate_chat_completion(
    request: openai_pb2.CreateChatCompletionRequest, limits: RequestLimits
) -> openai_compat.ChatPlan:
    """Checks the request; returns (role, text) of each message and how tools are used."""
    refuse_non_finite(request)
    out = Violations()
    _openai_sampling(request, limits, out)
    _response_format(request, out)
    plan = _tool_plan(request, limits, out)
    if len(request.messages) == 0:
        out.add("messages", "must not be empty")
    if len(request.messages) > limits.max_messages:
        out.add(
            "messages", f"has {len(request.messages)} messages, more than the limit of {limits.max_messages}"
        )
    turns = []
    for index, message in enumerate(request.messages):
        if message.role not in OPENAI_ROLES:
            out.add(
                f"messages[{index}].role", f"must be one of {', '.join(OPENAI_ROLES)}, got {message.role!r}"
            )
        text = _turn_text(message, index, plan, out)
        out.text(f"messages[{index}].content", text, limits.max_prompt_chars, required=False)
        turns.append(("system" if message.role == "developer" else message.role, text))
    out.raise_if_any()
    return openai_compat.ChatPlan(tuple(turns), plan)


def validate_completion(request: openai_pb2.CreateCompletionRequest, limits: RequestLimits) -> list[str]:
    """Checks the request; returns its prompts."""
    refuse_non_finite(request)
    out = Violations()
    _openai_sampling(request, limits, out)
    _response_format(request, out)
    data = _plain(request.prompt)
    prompts: list[str] = []
    if isinstance(data, str):
        prompts = [data]
    elif isinstance(data, list) and data and all(isinstance(item, str) for item in data):
        prompts = list(data)
    elif isinstance(data, list) and data and all(isinstance(item, (float, list)) for item in data):
        out.add("prompt", "token-id prompts are not supported here; send the prompt as text")
    else:
        out.add("prompt", "must be a non-empty string or list of strings")
    if len(prompts) > limits.max_sequences:
        out.add("prompt", f"has {len(prompts)} prompts, more than the limit of {limits.max_sequences}")
    for index, prompt in enumerate(prompts):
        out.text("prompt" if isinstance(data, str) else f"prompt[{index}]", prompt, limits.max_prompt_chars)
    out.raise_if_any()
    return prompts


def validate_openai_embedding(request: openai_pb2.CreateEmbeddingRequest, limits: RequestLimits) -> None:
    refuse_non_finite(request)
    out = Violations()
    embedding_inputs(request.input, "input", limits, out)
    if request.encoding_format not in ("", "float", "base64"):
        out.add("encoding_format", f"must be 'float' or 'base64', got {request.encoding_format!r}")
    out.int_range("dimensions", request.dimensions if request.HasField("dimensions") else None, 1, 65536)
    if not request.model.strip():
        out.add("model", "is required")
    out.raise_if_any()
