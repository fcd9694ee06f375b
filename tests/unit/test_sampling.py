"""The sampling contract without a model: defaults, the greedy rule, the ranges and their messages."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from inference.v1 import common_pb2

from services.common import sampling
from services.common.sampling import DEFAULT_LIMITS, SamplingLimits, SamplingParams

P = common_pb2.SamplingParameters


def test_from_proto_of_no_knobs_is_greedy_with_the_server_default_length() -> None:
    assert sampling.from_proto(P(), 77) == SamplingParams(max_new_tokens=77)


def test_from_proto_copies_every_knob() -> None:
    stop = struct_pb2.Value()
    stop.list_value.extend(["\n", "END"])
    parameters = P(
        max_new_tokens=5,
        temperature=0.5,
        top_p=0.875,
        top_k=40,
        repetition_penalty=1.25,
        num_return_sequences=2,
        num_beams=1,
        seed=9,
        stop=stop,
    )
    assert sampling.from_proto(parameters, 77) == SamplingParams(
        max_new_tokens=5,
        do_sample=True,
        temperature=0.5,
        top_k=40,
        top_p=0.875,
        repetition_penalty=1.25,
        seed=9,
        stop=("\n", "END"),
        num_return_sequences=2,
        num_beams=1,
    )


def test_a_single_stop_string_is_one_sequence() -> None:
    parameters = P(stop=struct_pb2.Value(string_value="\n"))
    assert sampling.from_proto(parameters, 8).stop == ("\n",)


@pytest.mark.parametrize(
    ("parameters", "greedy"),
    [
        (P(), True),
        (P(temperature=0.0), True),
        (P(temperature=0.0, do_sample=True), True),
        (P(do_sample=False, temperature=0.9), True),
        (P(do_sample=True), False),
        (P(temperature=0.7), False),
        (P(top_p=0.9), False),
        (P(top_k=5), False),
        (P(repetition_penalty=1.3), True),
    ],
)
def test_greedy_rule(parameters: common_pb2.SamplingParameters, greedy: bool) -> None:
    assert sampling.is_greedy(parameters) is greedy
    assert sampling.from_proto(parameters, 8).do_sample is not greedy


def test_temperature_zero_is_greedy_even_when_sampling_is_asked_for() -> None:
    assert not sampling.from_proto(P(temperature=0.0, do_sample=True), 8).do_sample


def test_a_greedy_request_still_has_its_temperature_checked() -> None:
    found = sampling.violations(P(do_sample=False, temperature=-1.0))
    assert [name for name, _ in found] == ["parameters.temperature"]


def test_resolved_params_are_checked_against_the_same_ranges() -> None:
    params = SamplingParams(max_new_tokens=0, top_p=0.0, num_beams=2, num_return_sequences=3, stop=("",))
    assert {name for name, _ in sampling.params_violations(params)} == {
        "parameters.max_new_tokens",
        "parameters.top_p",
        "parameters.num_return_sequences",
        "parameters.stop[0]",
    }


def test_is_deterministic_when_greedy_or_seeded() -> None:
    assert sampling.is_deterministic(P())
    assert sampling.is_deterministic(P(do_sample=True, seed=1))
    assert sampling.is_deterministic(P(temperature=0.0))
    assert not sampling.is_deterministic(P(do_sample=True))
    assert not sampling.is_deterministic(P(temperature=0.7))
    assert not sampling.is_deterministic(P(top_k=5))


def test_valid_knobs_have_no_violations() -> None:
    parameters = P(max_new_tokens=DEFAULT_LIMITS.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0)
    assert sampling.violations(parameters) == []


def _stop(*items: str | float) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.list_value.extend(list(items))
    return value


@pytest.mark.parametrize(
    ("parameters", "field", "limit"),
    [
        (P(max_new_tokens=0), "parameters.max_new_tokens", "between 1 and 4096"),
        (P(max_new_tokens=4097), "parameters.max_new_tokens", "between 1 and 4096"),
        (P(temperature=-0.5), "parameters.temperature", "[0, 100]"),
        (P(temperature=float("nan")), "parameters.temperature", "[0, 100]"),
        (P(top_p=0.0), "parameters.top_p", "(0, 1]"),
        (P(top_p=1.5), "parameters.top_p", "(0, 1]"),
        (P(top_k=-1), "parameters.top_k", "between 0 and 1000000"),
        (P(repetition_penalty=0.0), "parameters.repetition_penalty", "(0, 10]"),
        (P(repetition_penalty=11.0), "parameters.repetition_penalty", "(0, 10]"),
        (P(num_return_sequences=0), "parameters.num_return_sequences", "between 1 and 8"),
        (P(num_return_sequences=9), "parameters.num_return_sequences", "between 1 and 8"),
        (P(num_beams=0), "parameters.num_beams", "between 1 and 8"),
        (P(num_beams=9), "parameters.num_beams", "between 1 and 8"),
        (P(num_beams=2, num_return_sequences=3), "parameters.num_return_sequences", "num_beams (2)"),
        (P(stop=struct_pb2.Value(number_value=3)), "parameters.stop", "a string or a list of strings"),
        (P(stop=_stop("a", 1.0)), "parameters.stop[1]", "must be a string"),
        (P(stop=_stop("a", "b", "c", "d", "e")), "parameters.stop", "limit of 4"),
        (P(stop=_stop("ok", "")), "parameters.stop[1]", "1 to 256 characters"),
        (P(stop=struct_pb2.Value(string_value="x" * 257)), "parameters.stop[0]", "1 to 256 characters"),
    ],
)
def test_each_violation_names_its_field_and_limit(
    parameters: common_pb2.SamplingParameters, field: str, limit: str
) -> None:
    found = sampling.violations(parameters)
    assert [name for name, _ in found] == [field]
    assert limit in found[0][1]


def test_a_tier_may_change_a_count_limit() -> None:
    limits = SamplingLimits(max_stop_sequences=1, max_new_tokens=10)
    found = dict(sampling.violations(P(max_new_tokens=11, stop=_stop("a", "b")), limits))
    assert "between 1 and 10" in found["parameters.max_new_tokens"]
    assert "limit of 1" in found["parameters.stop"]
