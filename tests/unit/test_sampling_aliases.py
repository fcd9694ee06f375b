"""The seed-style aliases of SamplingParameters: max_tokens for max_new_tokens and stop_sequences
for stop, resolved in services/common/sampling.py for every tier."""

from __future__ import annotations

from google.protobuf import struct_pb2
from inference.v1 import common_pb2

from services.common import sampling

P = common_pb2.SamplingParameters


def _stop(*items: str) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.list_value.extend(list(items))
    return value


def test_max_tokens_stands_for_max_new_tokens() -> None:
    assert sampling.from_proto(P(max_tokens=7), 99).max_new_tokens == 7
    assert sampling.violations(P(max_tokens=7)) == []


def test_stop_sequences_stand_for_stop() -> None:
    assert sampling.from_proto(P(stop_sequences=["\n", "END"]), 9).stop == ("\n", "END")
    assert sampling.violations(P(stop_sequences=["\n"])) == []


def test_both_names_with_the_same_value_are_fine() -> None:
    parameters = P(max_tokens=5, max_new_tokens=5, stop_sequences=["END"], stop=_stop("END"))
    assert sampling.violations(parameters) == []
    resolved = sampling.from_proto(parameters, 99)
    assert resolved.max_new_tokens == 5 and resolved.stop == ("END",)
    single = struct_pb2.Value(string_value="END")
    assert sampling.violations(P(stop_sequences=["END"], stop=single)) == []


def test_both_names_with_different_values_name_both_fields() -> None:
    bad = sampling.violations(P(max_tokens=5, max_new_tokens=6))
    assert len(bad) == 1
    field, problem = bad[0]
    assert field == "parameters.max_tokens"
    assert "parameters.max_new_tokens" in problem and "5" in problem and "6" in problem


def test_different_stop_lists_name_both_fields() -> None:
    bad = sampling.violations(P(stop_sequences=["a"], stop=_stop("b")))
    assert [field for field, _ in bad] == ["parameters.stop_sequences"]
    assert "parameters.stop" in bad[0][1]


def test_the_conflict_is_a_wire_violation_the_generator_sees_too() -> None:
    assert [f for f, _ in sampling.wire_violations(P(max_tokens=1, max_new_tokens=2))] == [
        "parameters.max_tokens"
    ]
    assert sampling.wire_violations(P(max_tokens=2, max_new_tokens=2)) == []


def test_a_range_problem_names_the_alias_the_client_sent() -> None:
    limit = sampling.DEFAULT_LIMITS.max_new_tokens
    bad = sampling.violations(P(max_tokens=limit + 1))
    assert [field for field, _ in bad] == ["parameters.max_tokens"]
    assert str(limit) in bad[0][1]
    bad = sampling.violations(P(stop_sequences=[""]))
    assert [field for field, _ in bad] == ["parameters.stop_sequences[0]"]
    bad = sampling.violations(P(stop_sequences=["a"] * (sampling.DEFAULT_LIMITS.max_stop_sequences + 1)))
    assert [field for field, _ in bad] == ["parameters.stop_sequences"]


def test_the_canonical_name_keeps_its_own_name_in_range_problems() -> None:
    bad = sampling.violations(P(max_new_tokens=0))
    assert [field for field, _ in bad] == ["parameters.max_new_tokens"]
