"""The typed client's output constraints without a server: one knob per constraint on the wire,
at most one per request, and `parsed` from a dict schema, json_object or a model class."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from inference.v1 import common_pb2, generation_pb2
from inference_client import FinishReason, _convert
from inference_client.options import GenerateOptions
from pydantic import BaseModel


class City(BaseModel):
    name: str
    population: int


def test_each_constraint_goes_to_its_field() -> None:
    schema = _convert.sampling_parameters({"json_schema": City})
    assert json_format.MessageToDict(schema.json_schema)["properties"]["population"]["type"] == "integer"
    assert _convert.sampling_parameters({"json_schema": {"type": "object"}}).HasField("json_schema")
    assert _convert.sampling_parameters({"json_object": True}).json_object
    assert _convert.sampling_parameters({"regex": "[0-9]+"}).regex == "[0-9]+"
    assert list(_convert.sampling_parameters({"choice": ["a", "b"]}).choice) == ["a", "b"]
    assert _convert.sampling_parameters({"grammar": "start: x"}).grammar == "start: x"
    assert _convert.sampling_parameters({"temperature": 0.5}).WhichOneof("constraint") is None


def test_two_constraints_are_refused_before_sending() -> None:
    options: GenerateOptions = {"regex": "a", "choice": ["a"]}
    with pytest.raises(ValueError, match="at most one output constraint"):
        _convert.sampling_parameters(options)


def test_one_string_is_no_choice_list_and_json_object_false_is_no_constraint() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        _convert.sampling_parameters({"choice": "red"})
    options: GenerateOptions = {"json_object": False, "regex": "[a-z]+"}
    assert _convert.sampling_parameters(options).WhichOneof("constraint") == "regex"


def reply(text: str) -> generation_pb2.GenerateResponse:
    reason = common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE
    sequence = common_pb2.GeneratedSequence(index=0, text=text, finish_reason=reason)
    return generation_pb2.GenerateResponse(generated_text=text, finish_reason=reason, sequences=[sequence])


def test_parsed_is_the_object_the_model_instance_or_none() -> None:
    text = '{"name": "Oslo", "population": 700000}'
    generated = _convert.generation_parsed(
        _convert.generation(reply(text)), _convert.parser({"json_schema": City})
    )
    assert generated.parsed == City(name="Oslo", population=700000)
    assert generated.sequences[0].parsed == generated.parsed
    assert generated.finish_reason is FinishReason.CONSTRAINT_COMPLETE
    plain = _convert.generation_parsed(
        _convert.generation(reply(text)), _convert.parser({"json_object": True})
    )
    assert plain.parsed == {"name": "Oslo", "population": 700000}
    cut = _convert.generation_parsed(
        _convert.generation(reply(text[:9])), _convert.parser({"json_schema": City})
    )
    assert cut.parsed is None
    assert _convert.parser({"regex": "x"}) is None
