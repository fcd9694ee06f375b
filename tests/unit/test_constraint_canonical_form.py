"""The constraint's canonical form: the compile cache key, and the property order the output follows."""

from __future__ import annotations

import json

from inference.v1 import common_pb2

from services.common.sampling import constraint_of, from_proto, violations


def test_schema_properties_follow_the_required_list_not_the_wire_order() -> None:
    parameters = common_pb2.SamplingParameters()
    parameters.json_schema.update(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "age": {"type": "integer"}, "note": {}},
            "required": ["city", "age"],
        }
    )
    constraint = constraint_of(parameters)
    assert constraint is not None and constraint.kind == "json_schema"
    assert list(json.loads(constraint.value)["properties"]) == ["city", "age", "note"]


def test_integral_numbers_stay_integers_and_equal_schemas_have_equal_keys() -> None:
    first, second = common_pb2.SamplingParameters(), common_pb2.SamplingParameters()
    first.json_schema.update({"type": "array", "maxItems": 3})
    second.json_schema.update({"maxItems": 3.0, "type": "array"})
    assert constraint_of(first) == constraint_of(second)
    assert '"maxItems":3' in from_proto(first, 8).constraint.value  # type: ignore[union-attr]


def test_empty_choice_and_regex_are_refused_naming_the_field() -> None:
    choice = common_pb2.SamplingParameters()
    choice.choice.SetInParent()
    regex = common_pb2.SamplingParameters(regex="")
    assert [field for field, _ in violations(choice)] == ["parameters.choice"]
    assert [field for field, _ in violations(regex)] == ["parameters.regex"]


def test_a_constraint_with_beam_search_is_refused() -> None:
    parameters = common_pb2.SamplingParameters(regex="[a-z]+", num_beams=2)
    assert ("parameters.regex", "is not supported with num_beams above 1 (beam search)") in violations(
        parameters
    )
