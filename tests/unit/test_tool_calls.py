"""OpenAI tool calls without a process: tool and tool_choice checks, the forced call's JSON Schema
and system message, the parsing of constrained and Hermes-style replies, response_format, and the
unary and streamed rendering of a call."""

from __future__ import annotations

import json
from typing import Any

import grpc
import jsonschema  # type: ignore[import-untyped]
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from inference.v1 import common_pb2, generation_pb2, openai_pb2

from services.common import sampling
from services.gateway import openai_compat as oai
from services.gateway import tools, validation
from services.gateway.errors import GatewayError
from services.gateway.tools import Tool, ToolChoice, ToolPlan

LIMITS = validation.RequestLimits()
WEATHER = Tool(
    "get_weather",
    "The weather of a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"],
    },
)
TIME = Tool("get_time")
REQUIRED = ToolPlan((WEATHER, TIME), ToolChoice("required"))
NAMED = ToolPlan((WEATHER, TIME), ToolChoice("function", "get_weather"))


def violations(error: GatewayError) -> dict[str, str]:
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    (detail,) = error.details
    assert isinstance(detail, error_details_pb2.BadRequest)
    return {item.field: item.description for item in detail.field_violations}


def chat_request(**fields: Any) -> openai_pb2.CreateChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "weather in Paris?"}], **fields}
    return json_format.ParseDict(body, openai_pb2.CreateChatCompletionRequest())


def refused(request: openai_pb2.CreateChatCompletionRequest) -> dict[str, str]:
    with pytest.raises(GatewayError) as bad:
        validation.validate_chat_completion(request, LIMITS)
    return violations(bad.value)


def weather_tool(name: str = "get_weather", parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": "weather"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


# --- tools and tool_choice ------------------------------------------------------------------


def test_tools_are_checked_by_type_name_uniqueness_and_parameters() -> None:
    problems = dict(
        tools.tool_violations(
            [
                {"type": "retrieval", "function": {"name": "z"}},
                {"type": "function", "function": {"name": "bad name!"}},
                {"type": "function", "function": {"name": "a"}},
                {"type": "function", "function": {"name": "a"}},
                {"type": "function", "function": {"name": "b", "parameters": {"type": "array"}}},
                {"type": "function"},
            ]
        )
    )
    assert set(problems) == {
        "tools[0].type",
        "tools[1].function.name",
        "tools[3].function.name",
        "tools[4].function.parameters",
        "tools[5].function",
    }
    assert "unique" in problems["tools[3].function.name"]
    assert tools.tool_violations([{"type": "function", "function": {"name": "x" * 64}}]) == []
    assert tools.tool_violations([{"type": "function", "function": {"name": "x" * 65}}])


def test_tool_choice_resolves_or_says_what_is_accepted() -> None:
    names = ["get_weather", "get_time"]
    assert tools.choice_of(None, names) == ToolChoice("auto")
    assert tools.choice_of(None, []) == ToolChoice("none")
    assert tools.choice_of("none", []) == ToolChoice("none")
    assert tools.choice_of("required", names) == ToolChoice("required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert tools.choice_of(named, names) == ToolChoice("function", "get_time")
    assert "not among the tools" in str(
        tools.choice_of({"type": "function", "function": {"name": "x"}}, names)
    )
    assert "needs tools" in str(tools.choice_of("required", []))
    assert '"none", "auto", "required"' in str(tools.choice_of("always", names))


def test_a_forced_call_is_constrained_to_the_callable_tools_schema() -> None:
    schema = tools.call_schema(REQUIRED)
    good = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}
    jsonschema.validate(good, schema)
    jsonschema.validate({"name": "get_time", "parameters": {}}, schema)
    for bad in (
        {"name": "get_weather", "parameters": {"unit": "C"}},
        {"name": "other", "parameters": {}},
        {"name": "get_time"},
        {**good, "extra": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = tools.call_schema(NAMED)
    assert "anyOf" not in named and named["properties"]["name"] == {"const": "get_weather"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "parameters": {}}, named)
    # The name comes first in the canonical text the engine compiles (the required list's order).
    text = sampling.canonical_json(named)
    assert text.index('"name"') < text.index('"parameters"')


ADDRESS_BOOK = Tool(
    "add_contact",
    "Add a contact (a schema as pydantic writes nested models: $defs and $ref)",
    {
        "$defs": {
            "Address": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"name": {"type": "string"}, "home": {"$ref": "#/$defs/Address"}},
        "required": ["name", "home"],
        "additionalProperties": False,
    },
)


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "add_contact")])
def test_a_tool_schema_with_defs_keeps_its_references_inside_the_call_schema(choice: ToolChoice) -> None:
    schema = tools.call_schema(ToolPlan((ADDRESS_BOOK, TIME), choice))
    good = {"name": "add_contact", "parameters": {"name": "Ada", "home": {"city": "Paris"}}}
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add_contact", "parameters": {"name": "Ada", "home": {}}}, schema)
    # The grammar compiler resolves the rebased references too (it refused the nested pointers).
    matcher = pytest.importorskip("llguidance").LLMatcher
    assert matcher.validate_grammar(matcher.grammar_from_json_schema(sampling.canonical_json(schema))) == ""


def test_the_system_message_describes_the_tools_and_the_answer_shape() -> None:
    prompt = tools.system_prompt(REQUIRED)
    assert "get_weather: The weather of a city" in prompt and "get_time" in prompt
    assert '"city"' in prompt and '"parameters"' in prompt
    named = tools.system_prompt(NAMED)
    assert "get_time" not in named and '{"name": "get_weather"' in named


def test_a_constrained_reply_parses_into_one_call() -> None:
    call = tools.parse_forced('{"name": "get_weather", "parameters": {"city": "Paris"}}', REQUIRED)
    assert call is not None and call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert tools.parse_forced('{"name": "get_weather", "parameters": {"ci', REQUIRED) is None
    assert tools.parse_forced('{"name": "get_time", "parameters": {}}', NAMED) is None
    assert tools.parse_forced("[1]", REQUIRED) is None


def test_hermes_blocks_parse_into_calls_and_leave_the_rest_as_content() -> None:
    text = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>'
    )
    content, calls = tools.parse_hermes(text)
    assert content == "Let me look."
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({call.id for call in calls}) == 2
    only = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert tools.parse_hermes(only)[0] is None
    assert tools.parse_hermes("plain answer") == ("plain answer", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert tools.parse_hermes(broken) == (broken, [])
    # An unclosed last block (the reply stopped at the template's end token) still counts.
    assert tools.parse_hermes('<tool_call>{"name": "f", "arguments": {"a": 1}}')[1][0].arguments == '{"a": 1}'


def test_the_hermes_splitter_streams_content_and_holds_back_a_call() -> None:
    splitter = tools.HermesSplitter()
    sent = [
        splitter.feed(piece) for piece in ["Hi ", "<tool", "_call>", '{"name": "f", ', '"arguments": {}}']
    ]
    assert sent == ["Hi ", "", "", "", ""]
    rest, calls = splitter.finish()
    assert rest == "" and [call.name for call in calls] == ["f"]
    plain = tools.HermesSplitter()
    assert plain.feed("a <b") == "a <b" and plain.feed(" <to") == " " and plain.feed("y") == "<toy"
    assert plain.finish() == ("", [])


def test_history_writes_calls_in_the_shape_the_model_answers_with() -> None:
    assert json.loads(tools.call_text("f", '{"a": 1}')) == {"name": "f", "parameters": {"a": 1}}
    hermes = tools.hermes_text("f", '{"a": 1}')
    assert hermes.startswith("<tool_call>") and tools.parse_hermes(hermes)[1][0].name == "f"


# --- requests -------------------------------------------------------------------------------


def test_required_tools_add_a_system_message_and_a_schema_constraint() -> None:
    request = chat_request(
        tools=[weather_tool(parameters={"type": "object", "properties": {"city": {"type": "string"}}})],
        tool_choice="required",
    )
    plan = validation.validate_chat_completion(request, LIMITS)
    assert plan.tools.forced and not plan.tools.templated
    fields = oai.chat_fields(request, plan, "m")
    assert fields["messages"][0].role == "system" and "get_weather" in fields["messages"][0].content
    constraint = sampling.constraint_of(fields["parameters"])
    assert constraint is not None and constraint.kind == "json_schema"
    assert json.loads(constraint.value)["properties"]["name"] == {"const": "get_weather"}


def test_auto_tools_go_to_the_chat_template() -> None:
    request = chat_request(tools=[weather_tool()])
    plan = validation.validate_chat_completion(request, LIMITS)
    assert plan.tools.templated
    native = oai.chat_request(request, plan, "m")
    assert len(native.messages) == 1 and not native.parameters.HasField("json_schema")
    assert json_format.MessageToDict(native.tools[0])["function"]["parameters"] == {"type": "object"}
    assert "n" in refused(chat_request(tools=[weather_tool()], n=2))


def test_none_sends_no_tools_and_no_constraint() -> None:
    request = chat_request(tools=[weather_tool()], tool_choice="none")
    plan = validation.validate_chat_completion(request, LIMITS)
    assert not plan.tools.forced and not plan.tools.templated
    assert sampling.constraint_of(oai.chat_fields(request, plan, "m")["parameters"]) is None


def test_bad_tool_choice_response_format_and_their_conflict_are_refused() -> None:
    assert "tool_choice" in refused(chat_request(tool_choice="required"))
    assert "tool_choice" in refused(
        chat_request(tools=[weather_tool()], tool_choice={"type": "function", "function": {"name": "nope"}})
    )
    assert "tool_choice" in refused(chat_request(tools=[weather_tool()], tool_choice="sometimes"))
    problem = refused(chat_request(response_format={"type": "xml"}))["response_format.type"]
    assert "text, json_object, json_schema" in problem
    assert "response_format.json_schema.schema" in refused(
        chat_request(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    )
    both = chat_request(
        tools=[weather_tool()], tool_choice="required", response_format={"type": "json_object"}
    )
    assert "one constraint" in refused(both)["response_format"]
    assert "tools[0].function.name" in refused(chat_request(tools=[weather_tool("a b")]))


def test_response_format_becomes_the_native_constraint() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}
    request = chat_request(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    plan = validation.validate_chat_completion(request, LIMITS)
    constraint = sampling.constraint_of(oai.chat_fields(request, plan, "m")["parameters"])
    assert constraint == sampling.Constraint("json_schema", sampling.canonical_json(schema))
    completion = json_format.ParseDict(
        {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}},
        openai_pb2.CreateCompletionRequest(),
    )
    validation.validate_completion(completion, LIMITS)
    assert oai.sampling_parameters(completion).json_object
    text = json_format.ParseDict(
        {"model": "m", "prompt": "x", "response_format": {"type": "text"}},
        openai_pb2.CreateCompletionRequest(),
    )
    assert oai.sampling_parameters(text).WhichOneof("constraint") is None


def test_history_with_tool_calls_and_tool_results_is_accepted() -> None:
    request = chat_request(
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        ],
        tools=[weather_tool()],
        tool_choice="none",
    )
    turns = validation.validate_chat_completion(request, LIMITS).turns
    assert [role for role, _ in turns] == ["user", "assistant", "tool"]
    assert json.loads(turns[1][1]) == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert turns[2][1] == "18C and sunny"


# --- replies --------------------------------------------------------------------------------


def reply(
    text: str, reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE
) -> generation_pb2.GenerateResponse:
    sequence = common_pb2.GeneratedSequence(index=0, text=text, finish_reason=reason)
    return generation_pb2.GenerateResponse(request_id="r", generated_text=text, sequences=[sequence])


def test_a_forced_reply_is_a_tool_call_with_null_content() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    (choice,) = oai.chat_response(reply(text), "m", plan=REQUIRED).choices
    assert choice.finish_reason == "tool_calls" and not choice.message.HasField("content")
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    cut = oai.chat_response(reply(text[:20], common_pb2.FINISH_REASON_LENGTH), "m", plan=REQUIRED).choices[0]
    assert cut.finish_reason == "length" and cut.message.content == text[:20] and not cut.message.tool_calls


def test_a_completed_constraint_finishes_as_stop() -> None:
    assert oai.finish_reason(common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE) == "stop"
    (choice,) = oai.chat_response(reply('{"a": 1}'), "m").choices
    assert choice.finish_reason == "stop" and choice.message.content == '{"a": 1}'


def stream_message(
    text: str, finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
) -> generation_pb2.GenerateStreamResponse:
    return generation_pb2.GenerateStreamResponse(
        request_id="r", index=0, token=common_pb2.Token(text=text), finish_reason=finish
    )


def streamed(
    chunker: oai.ChatChunker, pieces: list[str], finish: common_pb2.FinishReason.ValueType
) -> list[dict[str, Any]]:
    chunks = [chunk for piece in pieces for chunk in chunker.feed(stream_message(piece))]
    chunks += chunker.feed(stream_message("", finish))
    return [oai.chat_chunk_json(chunk) for chunk in chunks]


def test_a_streamed_forced_call_comes_as_openais_deltas() -> None:
    pieces = ['{"name": "get_', 'weather", "parameters": ', '{"city": "Paris"}}']
    bodies = streamed(
        oai.ChatChunker("m", False, plan=REQUIRED), pieces, common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE
    )
    deltas = [body["choices"][0]["delta"] for body in bodies]
    assert deltas[0] == {"role": "assistant", "content": ""}
    head, rest = deltas[1]["tool_calls"][0], deltas[2]["tool_calls"][0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert rest == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert bodies[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("content" not in delta for delta in deltas[1:])


def test_a_streamed_templated_reply_sends_content_then_calls() -> None:
    plan = ToolPlan((WEATHER,), ToolChoice("auto"))
    pieces = [
        "Sure. ",
        "<tool_call>",
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        "</tool_call>",
    ]
    bodies = streamed(oai.ChatChunker("m", False, plan=plan), pieces, common_pb2.FINISH_REASON_EOS_TOKEN)
    deltas = [body["choices"][0]["delta"] for body in bodies]
    assert deltas[1] == {"content": "Sure. "}
    assert deltas[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert bodies[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = streamed(
        oai.ChatChunker("m", False, plan=plan), ["It is ", "sunny."], common_pb2.FINISH_REASON_EOS_TOKEN
    )
    assert "".join(body["choices"][0]["delta"].get("content", "") for body in plain) == "It is sunny."
    assert plain[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_chat_reply_reads_as_a_generation() -> None:
    native = generation_pb2.ChatResponse(
        request_id="r",
        message=common_pb2.ChatMessage(role="assistant", content="hi"),
        finish_reason=common_pb2.FINISH_REASON_EOS_TOKEN,
    )
    (choice,) = oai.chat_response(oai.generation_of_chat(native), "m").choices
    assert choice.message.content == "hi" and choice.finish_reason == "stop"


def test_tool_choice_value_may_be_null() -> None:
    request = chat_request(tools=[weather_tool()])
    request.tool_choice.null_value = struct_pb2.NULL_VALUE
    assert validation.validate_chat_completion(request, LIMITS).tools.templated


def test_the_tools_description_joins_the_clients_system_message() -> None:
    request = chat_request(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
        tools=[weather_tool()],
        tool_choice="required",
    )
    messages = oai.chat_fields(request, validation.validate_chat_completion(request, LIMITS), "m")["messages"]
    assert [message.role for message in messages] == ["system", "user"]
    assert "get_weather" in messages[0].content and messages[0].content.endswith("Be brief.")


def test_parameters_are_always_an_object_schema() -> None:
    assert Tool("f", parameters={}).schema == {"type": "object"}
    assert Tool("f", parameters={"properties": {"a": {}}}).schema["type"] == "object"


def test_an_oversized_schema_names_the_response_format_field() -> None:
    schema = {"type": "object", "description": "x" * 70_000}
    request = chat_request(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert "limit of 65536" in refused(request)["response_format.json_schema.schema"]
