"""Tools on the native chat route: a template without a tool format, a template that raises and a
malformed tool are each a field violation, never an internal error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import jinja2
import pytest
from google.protobuf import json_format
from inference.v1 import generation_pb2

from services.gateway import validation
from services.gateway.errors import GatewayError
from services.generator.engine import InvalidRequest
from tests.unit.fakes import EngineFactory, FakeTokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


class RaisingTemplateTokenizer(FakeTokenizer):
    """A template that refuses a role, as many templates do with raise_exception()."""

    chat_template = "{{ raise_exception('unknown role') }}"

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, str]],
        add_generation_prompt: bool,
        tokenize: bool,
        **extra: Any,
    ) -> list[int]:
        raise jinja2.TemplateError("Conversation roles must alternate user/assistant")


async def test_tools_on_a_template_without_a_tool_format_name_the_tools_field(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(start=False)
    with pytest.raises(InvalidRequest) as refused:
        engine.encode_chat([("user", "a")], [WEATHER])
    assert [field for field, _ in refused.value.violations] == ["tools"]


async def test_a_template_that_raises_is_a_violation_of_messages(make_engine: EngineFactory) -> None:
    engine = make_engine(tokenizer=RaisingTemplateTokenizer(), start=False)
    with pytest.raises(InvalidRequest) as refused:
        engine.encode_chat([("tool", "a")])
    ((field, problem),) = refused.value.violations
    assert field == "messages" and "must alternate" in problem


def test_a_malformed_tool_on_the_native_chat_is_refused_by_the_gateway() -> None:
    request = json_format.ParseDict(
        {
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "no spaces allowed"}}],
        },
        generation_pb2.ChatRequest(),
    )
    with pytest.raises(GatewayError) as refused:
        validation.validate_chat(request, validation.RequestLimits())
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tools[0].function.name" in refused.value.message
