"""Structured outputs through the official openai SDK against Envoy, the gateway and a real
generator (SmolLM2-135M): response_format json_schema and json_object, greedy and in a busy batch
of sampled requests, and tool calls forced by tool_choice, unary and streamed."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.test_structured_outputs import PERSON

ASK_PERSON: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Describe a person who lives in Paris as JSON."}
]
PERSON_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}},
                "required": ["city"],
            },
        },
    },
]
ASK_WEATHER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
# Bounded schemas: every string has a maxLength, so a complete answer fits in this many tokens.
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def client(openai_sdk: OpenAI) -> OpenAI:
    return openai_sdk


@pytest.fixture(scope="module")
def chat_model(generation_model: str) -> str:
    return generation_model


def test_json_schema_reply_validates_greedy(client: OpenAI, chat_model: str) -> None:
    reply = client.chat.completions.create(
        model=chat_model,
        messages=ASK_PERSON,
        temperature=0,
        max_tokens=MAX_TOKENS,
        response_format=PERSON_FORMAT,
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_json_schema_holds_for_50_sampled_requests_in_one_batch(client: OpenAI, chat_model: str) -> None:
    def ask(seed: int) -> str:
        reply = client.chat.completions.create(
            model=chat_model,
            messages=ASK_PERSON,
            temperature=1.0,
            seed=seed,
            max_tokens=MAX_TOKENS,
            response_format=PERSON_FORMAT,
        )
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=50) as pool:
        texts = list(pool.map(ask, range(50)))
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    # Sampling still samples: the constraint narrows the choices, it does not make them one.
    assert len(set(texts)) > 1


def test_json_object_reply_parses_on_both_endpoints(client: OpenAI, chat_model: str) -> None:
    reply = client.chat.completions.create(
        model=chat_model,
        messages=[{"role": "user", "content": "Give the capital of France as a JSON object."}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    completion = client.completions.create(
        model=chat_model,
        prompt="Give the capital of France as a JSON object.",
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(completion.choices[0].text), dict)


def check_weather_call(arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


def test_required_tool_choice_returns_a_valid_tool_call(client: OpenAI, chat_model: str) -> None:
    reply = client.chat.completions.create(
        model=chat_model,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    schema = next(
        tool["function"].get("parameters") for tool in TOOLS if tool["function"]["name"] == call.function.name
    )
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_call_concatenates_to_the_unary_call(client: OpenAI, chat_model: str) -> None:
    request: Any = {
        "model": chat_model,
        "messages": ASK_WEATHER,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    unary = client.chat.completions.create(**request).choices[0]
    assert unary.finish_reason == "tool_calls"
    (call,) = unary.message.tool_calls or []
    assert call.function.name == "get_weather"
    check_weather_call(call.function.arguments)
    names, arguments, ids, finishes = [], [], [], []
    for chunk in client.chat.completions.create(**request, stream=True):
        for part in chunk.choices[0].delta.tool_calls or []:
            assert part.index == 0
            ids.append(part.id)
            names.append(part.function.name if part.function else None)
            arguments.append(part.function.arguments if part.function else None)
        finishes.append(chunk.choices[0].finish_reason)
    assert ids[0] and ids[0].startswith("call_") and names[0] == "get_weather"
    assert "".join(item or "" for item in arguments) == call.function.arguments
    assert [reason for reason in finishes if reason] == ["tool_calls"]


def test_a_conversation_with_a_tool_result_is_answered(client: OpenAI, chat_model: str) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = client.chat.completions.create(
        model=chat_model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16
    )
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_auto_tools_on_a_template_without_a_tool_format_is_a_400(client: OpenAI, chat_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=chat_model, messages=ASK_WEATHER, tools=TOOLS, max_tokens=8)
    message = str(refused.value)
    assert "tools" in message and "tool_choice" in message and "required" in message


def test_bad_response_format_and_tool_choice_are_400s(client: OpenAI, chat_model: str) -> None:
    yaml: Any = {"type": "yaml"}
    with pytest.raises(openai.BadRequestError, match=r"response_format\.type"):
        client.chat.completions.create(model=chat_model, messages=ASK_PERSON, response_format=yaml)
    with pytest.raises(openai.BadRequestError, match=r"response_format\.json_schema\.schema"):
        client.chat.completions.create(
            model=chat_model,
            messages=ASK_PERSON,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=chat_model,
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch_rocket"}},
        )
    with pytest.raises(openai.BadRequestError, match="one constraint"):
        client.chat.completions.create(
            model=chat_model,
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice="required",
            response_format={"type": "json_object"},
        )


def test_a_refused_schema_is_a_400_naming_the_sent_field(client: OpenAI, chat_model: str) -> None:
    """The generator refuses what llguidance cannot enforce (uniqueItems); the client sees the field
    it sent, not the native parameters.json_schema."""
    unique: dict[str, Any] = {"type": "object", "properties": {"tags": {"uniqueItems": True}}}
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": unique}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=chat_model, messages=ASK_PERSON, max_tokens=8, response_format=response_format
        )
    assert refused.value.param == "response_format.json_schema.schema", refused.value.body
    assert "parameters." not in str(refused.value)
    with pytest.raises(openai.BadRequestError) as refused:
        stream = client.chat.completions.create(
            model=chat_model, messages=ASK_PERSON, max_tokens=8, response_format=response_format, stream=True
        )
        list(stream)
    assert refused.value.param == "response_format.json_schema.schema", refused.value.body
    tool: Any = {"type": "function", "function": {"name": "tag", "parameters": unique}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=chat_model, messages=ASK_WEATHER, tools=[tool], tool_choice="required", max_tokens=8
        )
    assert refused.value.param == "tools", refused.value.body
