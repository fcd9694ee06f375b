"""The sampling contract in one place: the engine's SamplingParams, the limits the gateway and the
generator both enforce, the conversion from the wire's SamplingParameters and the greedy rule. No torch
here: the gateway imports this module too."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf import json_format, struct_pb2
from inference.v1 import common_pb2

FIELD = "parameters"


ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `value` is the JSON Schema as canonical JSON text (see
    `canonical_json`), the regular expression, the Lark grammar, the choice list as a
    JSON array, or "" for json_object; equal constraints have equal values (the compile cache key)."""

    kind: ConstraintKind
    value: str

    @property
    def field(self) -> str:
        return f"{FIELD}.{self.kind}"


def _normalized(value: Any) -> Any:
    """Keys sorted and integral numbers as integers (Struct keeps every number as a double, so
    "maxItems": 3 arrives as 3.0), except that an object's `properties` follow its `required` list:
    the wire's map loses the sender's key order, and the enforced output writes the properties in
    the schema's order, so the required order (a list, kept on the wire) is the one to keep."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if not isinstance(value, dict):
        return value
    result = {key: _normalized(value[key]) for key in sorted(value)}
    properties, required = result.get("properties"), result.get("required")
    if isinstance(properties, dict) and isinstance(required, list):
        first = [name for name in dict.fromkeys(required) if isinstance(name, str) and name in properties]
        rest = [name for name in properties if name not in first]
        result["properties"] = {name: properties[name] for name in [*first, *rest]}
    return result


def canonical_json(value: Any) -> str:
    """`value` as compact JSON in the order `_normalized` gives: equal for equal values."""
    return json.dumps(_normalized(value), separators=(",", ":"), ensure_ascii=False)


def constraint_of(p: common_pb2.SamplingParameters) -> Constraint | None:
    """The request's constraint, or None (json_object false is none)."""
    kind = p.WhichOneof("constraint")
    if kind == "json_schema":
        return Constraint("json_schema", canonical_json(json_format.MessageToDict(p.json_schema)))
    if kind == "json_object":
        return Constraint("json_object", "") if p.json_object else None
    if kind == "regex":
        return Constraint("regex", p.regex)
    if kind == "grammar":
        return Constraint("grammar", p.grammar)
    if kind == "choice":
        return Constraint("choice", canonical_json(json_format.MessageToDict(p.choice)))
    return None


def non_finite(value: struct_pb2.Value | struct_pb2.Struct | struct_pb2.ListValue, path: str) -> list[str]:
    """The paths of the NaN and infinite numbers in a JSON value: a gRPC client can send them,
    but JSON has no such numbers, so json_format cannot print them (it raises ValueError)."""
    if isinstance(value, struct_pb2.Struct):
        return [bad for key, item in value.fields.items() for bad in non_finite(item, f"{path}.{key}")]
    if isinstance(value, struct_pb2.ListValue):
        return [bad for i, item in enumerate(value.values) for bad in non_finite(item, f"{path}[{i}]")]
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return [] if math.isfinite(value.number_value) else [path]
    if kind == "struct_value":
        return non_finite(value.struct_value, path)
    if kind == "list_value":
        return non_finite(value.list_value, path)
    return []


NON_FINITE = "must be a finite number (JSON has no NaN or Infinity)"


def _constraint_wire_violations(p: common_pb2.SamplingParameters) -> list[tuple[str, str]]:
    kind = p.WhichOneof("constraint")
    field = f"{FIELD}.{kind}"
    if kind in ("json_schema", "choice"):
        bad = [(path, NON_FINITE) for path in non_finite(getattr(p, kind), field)]
        if bad:
            return bad
    if kind == "choice":
        items = p.choice.values
        if not items:
            return [(field, "must be a non-empty list of strings")]
        return [
            (f"{field}[{i}]", "must be a non-empty string")
            for i, item in enumerate(items)
            if item.WhichOneof("kind") != "string_value" or not item.string_value
        ]
    if kind in ("regex", "grammar") and not getattr(p, kind):
        return [(field, "must not be empty")]
    return []


@dataclass(frozen=True)
class SamplingParams:
    """One request's knobs with every default resolved, as the engine samples with them."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_return_sequences: int = 1
    num_beams: int = 1
    # Logprobs asked for: each token's (reply detail), N alternatives each, the prompt's tokens.
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs in id order: immutable, and equal for equal maps.
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Constraint | None = None


@dataclass(frozen=True)
class SamplingLimits:
    """The accepted range of each knob; a tier's configuration may lower or raise a count limit."""

    max_new_tokens: int = 4096
    max_temperature: float = 100.0
    max_top_k: int = 1_000_000
    max_repetition_penalty: float = 10.0
    max_num_return_sequences: int = 8
    max_num_beams: int = 8
    max_stop_sequences: int = 4
    max_stop_length: int = 256
    max_top_logprobs: int = 20
    # OpenAI's ranges: presence and frequency penalties in [-max, max], biases in [-max, max].
    max_abs_penalty: float = 2.0
    max_abs_logit_bias: float = 100.0
    max_logit_bias_entries: int = 300
    # Characters of a JSON Schema (as compact JSON), regular expression, grammar or choice list.
    max_constraint_length: int = 65_536


DEFAULT_LIMITS = SamplingLimits()


def is_greedy(parameters: common_pb2.SamplingParameters) -> bool:
    """Temperature 0 is greedy; otherwise do_sample decides, and when it is absent any of
    temperature, top_p or top_k asks for sampling. Penalties and logit_bias only move the logits, so
    they leave a request greedy (and deterministic)."""
    if parameters.HasField("temperature") and parameters.temperature == 0.0:
        return True
    if parameters.HasField("do_sample"):
        return not parameters.do_sample
    return not (
        parameters.HasField("temperature") or parameters.HasField("top_p") or parameters.HasField("top_k")
    )


def is_deterministic(parameters: common_pb2.SamplingParameters) -> bool:
    """Greedy decoding or a fixed seed gives the same answer every time."""
    return parameters.HasField("seed") or is_greedy(parameters)


def stop_sequences(value: struct_pb2.Value) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """The stop strings of a string-or-list Value, and the (field path, problem) of unreadable ones."""
    field = f"{FIELD}.stop"
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return (), []
    if kind == "string_value":
        return (value.string_value,), []
    if kind != "list_value":
        return (), [(field, "must be a string or a list of strings")]
    items: list[str] = []
    bad: list[tuple[str, str]] = []
    for index, item in enumerate(value.list_value.values):
        if item.WhichOneof("kind") == "string_value":
            items.append(item.string_value)
        else:
            bad.append((f"{field}[{index}]", "must be a string"))
    return tuple(items), bad


def params_violations(
    params: SamplingParams, limits: SamplingLimits = DEFAULT_LIMITS
) -> list[tuple[str, str]]:
    """(field path, problem) of every resolved knob outside its range, naming the limit."""
    bad: list[tuple[str, str]] = []

    def count(name: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            bad.append((f"{FIELD}.{name}", f"must be between {low} and {high}, got {value}"))

    def real(name: str, value: float, low: float, high: float, low_open: bool) -> None:
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            bracket = "(" if low_open else "["
            bad.append((f"{FIELD}.{name}", f"must be in {bracket}{low:g}, {high:g}], got {value:g}"))

    count("max_new_tokens", params.max_new_tokens, 1, limits.max_new_tokens)
    real("temperature", params.temperature, 0.0, limits.max_temperature, low_open=False)
    real("top_p", params.top_p, 0.0, 1.0, low_open=True)
    count("top_k", params.top_k, 0, limits.max_top_k)
    real("repetition_penalty", params.repetition_penalty, 0.0, limits.max_repetition_penalty, low_open=True)
    count("num_return_sequences", params.num_return_sequences, 1, limits.max_num_return_sequences)
    count("num_beams", params.num_beams, 1, limits.max_num_beams)
    if 1 < params.num_beams < params.num_return_sequences:
        bad.append((f"{FIELD}.num_return_sequences", f"must not exceed num_beams ({params.num_beams})"))
    count("top_logprobs", params.top_logprobs, 0, limits.max_top_logprobs)
    if params.num_beams > 1:
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name):
                bad.append((f"{FIELD}.{name}", "is not supported with beam search (num_beams above 1)"))
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        real(name, value, -limits.max_abs_penalty, limits.max_abs_penalty, low_open=False)
    bad.extend(_logit_bias_violations(params, limits))
    if params.constraint is not None:
        field, size = params.constraint.field, len(params.constraint.value)
        if size > limits.max_constraint_length:
            bad.append(
                (field, f"has {size} characters, more than the limit of {limits.max_constraint_length}")
            )
        if params.num_beams > 1:
            bad.append((field, "is not supported with num_beams above 1 (beam search)"))
    if len(params.stop) > limits.max_stop_sequences:
        bad.append(
            (
                f"{FIELD}.stop",
                f"has {len(params.stop)} sequences, more than the limit of {limits.max_stop_sequences}",
            )
        )
    for index, item in enumerate(params.stop):
        if not 1 <= len(item) <= limits.max_stop_length:
            bad.append(
                (
                    f"{FIELD}.stop[{index}]",
                    f"must have 1 to {limits.max_stop_length} characters, has {len(item)}",
                )
            )
    return bad


def _stop_sent(p: common_pb2.SamplingParameters) -> bool:
    return p.stop.WhichOneof("kind") not in (None, "null_value")


def _max_new_tokens(p: common_pb2.SamplingParameters) -> int | None:
    if p.HasField("max_new_tokens"):
        return p.max_new_tokens
    return p.max_tokens if p.HasField("max_tokens") else None


def _stop(p: common_pb2.SamplingParameters) -> tuple[str, ...]:
    return stop_sequences(p.stop)[0] if _stop_sent(p) else tuple(p.stop_sequences)


def _alias_conflicts(p: common_pb2.SamplingParameters) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if p.HasField("max_tokens") and p.HasField("max_new_tokens") and p.max_tokens != p.max_new_tokens:
        bad.append(
            (
                f"{FIELD}.max_tokens",
                f"is an alias of {FIELD}.max_new_tokens and differs from it "
                f"({p.max_tokens} and {p.max_new_tokens}): send one of them",
            )
        )
    if p.stop_sequences and _stop_sent(p) and tuple(p.stop_sequences) != stop_sequences(p.stop)[0]:
        bad.append(
            (
                f"{FIELD}.stop_sequences",
                f"is an alias of {FIELD}.stop and differs from it: send one of them",
            )
        )
    return bad


def wire_violations(parameters: common_pb2.SamplingParameters) -> list[tuple[str, str]]:
    """(field path, problem) of what no range check can see: unreadable stop items, an alias
    that contradicts its canonical knob, an empty or malformed constraint."""
    return (
        stop_sequences(parameters.stop)[1]
        + _alias_conflicts(parameters)
        + _constraint_wire_violations(parameters)
    )


def _sent_name(p: common_pb2.SamplingParameters, path: str) -> str:
    """The path under the name the client used: a range problem of max_new_tokens that arrived
    as max_tokens names max_tokens (and stop[i] as stop_sequences[i])."""
    if path == f"{FIELD}.max_new_tokens" and not p.HasField("max_new_tokens") and p.HasField("max_tokens"):
        return f"{FIELD}.max_tokens"
    if path.startswith(f"{FIELD}.stop") and not _stop_sent(p) and p.stop_sequences:
        return f"{FIELD}.stop_sequences" + path.removeprefix(f"{FIELD}.stop")
    return path


def _logit_bias_violations(params: SamplingParams, limits: SamplingLimits) -> list[tuple[str, str]]:
    field = f"{FIELD}.logit_bias"
    bad: list[tuple[str, str]] = []
    entries, limit = len(params.logit_bias), limits.max_logit_bias_entries
    if entries > limit:
        bad.append((field, f"has {entries} entries, more than the limit of {limit}"))
    high = limits.max_abs_logit_bias
    for token, bias in params.logit_bias:
        if token < 0:
            bad.append((f"{field}[{token}]", f"token id {token} is negative"))
        if not math.isfinite(bias) or not -high <= bias <= high:
            bad.append((f"{field}[{token}]", f"must be in [{-high:g}, {high:g}], got {bias:g}"))
    if params.num_beams > 1:
        # Beam search runs outside the batch, without the batch's penalties and biases.
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(params, name) != 0.0:
                bad.append((f"{FIELD}.{name}", "is not supported with num_beams above 1 (beam search)"))
        if params.logit_bias:
            bad.append((field, "is not supported with num_beams above 1 (beam search)"))
    return bad


def violations(
    parameters: common_pb2.SamplingParameters, limits: SamplingLimits = DEFAULT_LIMITS
) -> list[tuple[str, str]]:
    """(field path, problem) of every knob on the wire that is unreadable, contradicts its alias
    or is outside its range; a problem is named by the field the client sent."""
    wire = wire_violations(parameters)
    if any(problem == NON_FINITE for _, problem in wire):
        return wire  # the constraint cannot be read, so its ranges cannot be checked
    # An absent max_new_tokens means the server's default, which is never out of range.
    ranges = params_violations(from_proto(parameters, default_max_new_tokens=1), limits)
    return wire + [(_sent_name(parameters, path), problem) for path, problem in ranges]


def from_proto(parameters: common_pb2.SamplingParameters, default_max_new_tokens: int) -> SamplingParams:
    """The request's knobs with the server's defaults, each alias (max_tokens, stop_sequences)
    read where its canonical knob is absent (check `violations` first)."""
    p = parameters
    greedy = is_greedy(p)
    max_new_tokens = _max_new_tokens(p)
    return SamplingParams(
        max_new_tokens=default_max_new_tokens if max_new_tokens is None else max_new_tokens,
        do_sample=not greedy,
        # Kept as sent (so that its range is checked); greedy decoding never reads it.
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=_stop(p),
        num_return_sequences=p.num_return_sequences if p.HasField("num_return_sequences") else 1,
        num_beams=p.num_beams if p.HasField("num_beams") else 1,
        logprobs=p.logprobs or p.top_logprobs > 0,
        top_logprobs=p.top_logprobs,
        prompt_logprobs=p.prompt_logprobs,
        presence_penalty=p.presence_penalty if p.HasField("presence_penalty") else 0.0,
        frequency_penalty=p.frequency_penalty if p.HasField("frequency_penalty") else 0.0,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        constraint=constraint_of(p),
    )
