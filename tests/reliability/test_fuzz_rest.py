"""Fuzzing the REST API from outside, through Envoy: schemathesis generates requests for every
operation of the live /openapi.json (valid ones and ones that break the schema), and Hypothesis
sends raw JSON bodies (random keys and types, numbers JSON parsers disagree on) to the main POST
routes. No answer may be a 5xx, and every 4xx must be JSON with an error message.

The stack is the session one (generator, embedder, gateway) with the SQLite predictions tier
and its Envoy in front. Requests stay cheap: token counts and alternatives are capped before
sending, and the admin operations that would change the shared stack (preloading and clearing
the embedder's models) are sent with a key without the admin scope."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import schemathesis
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inference.v1 import (
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    openai_pb2_grpc,
    predictions_pb2,
    predictions_pb2_grpc,
)

from tests.fixtures_predictions import PredictionsStack
from tests.reliability.figures import report
from tests.unit import test_gateway_validation_fuzz as fuzz

EXAMPLES_PER_OPERATION = 10
RAW_EXAMPLES_PER_ROUTE = 30
# Knobs that make a request expensive, capped wherever they appear in a body (at any depth, so
# predictions' input.parameters and deployments' defaults too).
CAPS = {
    "max_new_tokens": 4,
    "max_tokens": 4,
    "max_completion_tokens": 4,
    "n": 2,
    "num_return_sequences": 2,
    "num_beams": 2,
    "best_of": 2,
}
# Operations that change the shared embedder for every other test: sent without the admin scope.
NOT_AS_ADMIN = {"EmbeddingService_PreloadModels", "EmbeddingService_ClearCache"}
RAW_ROUTES = [
    "/generate",
    "/chat",
    "/solve/math",
    "/solve/coding",
    "/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/predictions",
]


@dataclass
class Tally:
    """What the fuzzing saw; `problems` holds one line per bad answer."""

    statuses: Counter[int] = field(default_factory=Counter)
    grpc_codes: Counter[str] = field(default_factory=Counter)
    operations: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def grpc_failures(self) -> int:
        return sum(self.grpc_codes[code.name] for code in FAILING_CODES)


def capped(value: Any) -> Any:
    """`value` with every expensive knob (CAPS) at most its cap."""
    if isinstance(value, list):
        return [capped(item) for item in value]
    if not isinstance(value, dict):
        return value
    result = {}
    for key, item in value.items():
        cap = CAPS.get(key)
        if cap is not None and isinstance(item, (int, float)) and not isinstance(item, bool) and item > cap:
            item = cap
        result[key] = capped(item)
    return result


NATIVE_GENERATION = ("/generate", "/chat", "/solve/")


def cheap(path: str, body: Any) -> Any:
    """`body` capped (CAPS), with a small token limit where it sets none: the server's default
    (256 tokens) takes seconds a request on this machine."""
    body = capped(body)
    if not isinstance(body, dict):
        return body
    if path.startswith(NATIVE_GENERATION):
        parameters = body.setdefault("parameters", {})
        if isinstance(parameters, dict) and not {"max_new_tokens", "max_tokens"} & parameters.keys():
            parameters["max_new_tokens"] = CAPS["max_new_tokens"]
    elif path.startswith(("/v1/chat/completions", "/v1/completions")):
        if not {"max_tokens", "max_completion_tokens"} & body.keys():
            body["max_tokens"] = CAPS["max_tokens"]
    elif path == "/v1/predictions" and isinstance(body.get("input"), dict):
        input = body["input"]
        if {"prompt", "messages", "problem"} & input.keys():
            parameters = input.setdefault("parameters", {})
            if isinstance(parameters, dict) and not {"max_new_tokens", "max_tokens"} & parameters.keys():
                parameters["max_new_tokens"] = CAPS["max_new_tokens"]
    return body


def error_message(body: Any) -> str:
    """The message of a native (google.rpc.Status) or OpenAI-shaped error body, or ""."""
    if not isinstance(body, dict):
        return ""
    nested = body.get("error")
    if isinstance(nested, dict) and isinstance(nested.get("message"), str):
        return str(nested["message"])
    return str(body["message"]) if isinstance(body.get("message"), str) else ""


def judge(tally: Tally, label: str, status: int, content_type: str, content: bytes, sent: str) -> None:
    """Counts one answer and notes it when it is a 5xx or a 4xx without a JSON error."""
    tally.statuses[status] += 1
    text = content.decode("utf-8", errors="backslashreplace")
    where = f"{label} -> {status} {content_type!r} {text[:300]!r} (sent {sent[:300]!r})"
    if status >= 500:
        tally.problems.append(f"server error: {where}")
    elif status >= 400:
        try:
            body = json.loads(content.decode("utf-8"))
        except ValueError:
            body = None
        if not content_type.startswith("application/json") or not error_message(body):
            tally.problems.append(f"4xx without a JSON error: {where}")


@pytest.fixture(scope="module")
def stack(predictions_sqlite: PredictionsStack) -> PredictionsStack:
    return predictions_sqlite


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    """The module's counts, reported once both tests have run."""
    seen = Tally()
    yield seen
    report(
        "fuzz",
        operations=len(seen.operations),
        requests=seen.requests,
        grpc_requests=sum(seen.grpc_codes.values()),
        grpc_internal_or_unavailable=seen.grpc_failures,
        status_5xx=seen.server_errors,
        non_json_4xx=sum(1 for line in seen.problems if line.startswith("4xx")),
        status_4xx=sum(count for status, count in seen.statuses.items() if 400 <= status < 500),
    )


FUZZED = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def fuzz_operation(operation: Any, url: str, headers: dict[str, str], tally: Tally) -> None:
    """EXAMPLES_PER_OPERATION requests of `operation`, valid and schema-breaking ones."""
    strategy = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    @settings(FUZZED, max_examples=EXAMPLES_PER_OPERATION)
    @given(strategy)
    def send(case: Any) -> None:
        if isinstance(case.body, (dict, list)):
            case.body = cheap(operation.path, case.body)
        response = case.call(base_url=url, headers=headers, timeout=60)
        content_type = (response.headers.get("content-type") or [""])[0]
        judge(tally, operation.label, response.status_code, content_type, response.content, repr(case.body))

    send()


def test_every_operation_of_the_live_schema(stack: PredictionsStack, tally: Tally) -> None:
    """schemathesis over every operation of the document Envoy serves: positive and negative
    examples, each answered without a 5xx and with a JSON error when refused."""
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    admin, user = stack.gateway.headers("admin"), stack.gateway.headers("user")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 30, [operation.label for operation in operations]
    for operation in operations:
        tally.operations.add(f"{operation.method.upper()} {operation.path}")
        as_admin = operation.definition.raw.get("operationId") not in NOT_AS_ADMIN
        fuzz_operation(operation, stack.url, admin if as_admin else user, tally)
    elapsed = time.monotonic() - started
    print(f"schemathesis: {len(operations)} operations, {tally.requests} requests in {elapsed:.0f} s")
    assert tally.problems == [], "\n".join(tally.problems[:20])


# Number literals that JSON parsers read differently: overflow, underflow, past 64 bits.
ODD_NUMBERS = ["1e999", "-1e999", "1e-999", "-0", "18446744073709551616", "-9223372036854775809", "0.1e1"]


class RawNumber(str):
    """A number literal written into the body as it is."""


def raw_json(value: Any) -> str:
    if isinstance(value, RawNumber):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(raw_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{raw_json(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float) and not math.isfinite(value):
        return "1e999" if value > 0 else "-1e999"
    return json.dumps(value)


# The keys the routes take (and a few they do not), so that bodies get past the unknown-field
# check often.
KEYS = [
    "prompt",
    "messages",
    "role",
    "content",
    "model",
    "parameters",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "json_schema",
    "choice",
    "logit_bias",
    "stream",
    "problem",
    "language",
    "input",
    "dimensions",
    "encoding_format",
    "tools",
    "tool_choice",
    "response_format",
    "type",
    "logprobs",
    "top_logprobs",
    "echo",
    "n",
    "max_tokens",
    "webhook",
    "x",
]
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.sampled_from(ODD_NUMBERS).map(RawNumber),
    st.text(max_size=20),
    st.sampled_from(["user", "assistant", "system", "m", "function", "json_schema", "object", ""]),
)
RAW_BODIES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=15,
)


def fuzz_route(client: httpx.Client, route: str, tally: Tally) -> None:
    """RAW_EXAMPLES_PER_ROUTE random JSON bodies POSTed to `route`."""

    @settings(FUZZED, max_examples=RAW_EXAMPLES_PER_ROUTE)
    @given(st.one_of(RAW_BODIES, st.dictionaries(st.sampled_from(KEYS), RAW_BODIES, max_size=6)))
    def send(body: Any) -> None:
        text = raw_json(cheap(route, body))
        reply = client.post(route, content=text.encode())
        content_type = reply.headers.get("content-type", "")
        judge(tally, f"POST {route}", reply.status_code, content_type, reply.content, text)

    send()


def test_raw_json_bodies(stack: PredictionsStack, tally: Tally) -> None:
    """Random JSON (and odd number literals) to the main POST routes: 4xx in JSON or a 2xx."""
    headers = {**stack.gateway.headers("user"), "content-type": "application/json"}
    before = len(tally.problems)
    with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
        for route in RAW_ROUTES:
            tally.operations.add(f"POST {route}")
            fuzz_route(client, route, tally)
    assert tally.problems[before:] == [], "\n".join(tally.problems[before:][:20])


@pytest.mark.parametrize(
    ("key", "named"),
    [
        # A surrogate pair (json.dumps writes astral characters so): one character, not two halves.
        ("\\ud88f\\udc87", "\U00033c87"),
        ("\\udc00x", "\ufffdx"),
        # An escaped backslash before "u" is a backslash, not the start of an escape.
        ("a\\\\u0041", "a\\u0041"),
    ],
)
def test_unknown_escaped_keys_are_named_in_utf8(stack: PredictionsStack, key: str, named: str) -> None:
    """Regression: Envoy's strict-field check decoded each surrogate of an escaped key on its own,
    so its 400 quoted the key in bytes that are not UTF-8 (and so not JSON)."""
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{key}": 1}}'
    headers = {**stack.gateway.headers("user"), "content-type": "application/json"}
    reply = httpx.post(f"{stack.url}/chat", content=body.encode(), headers=headers, timeout=30)
    assert reply.status_code == 400, reply.text
    error = json.loads(reply.content.decode("utf-8"))
    fields = [v["field"] for detail in error["details"] for v in detail.get("field_violations", [])]
    assert fields == [named], error


# Native gRPC through Envoy's listener: the unit fuzzer's messages, sent for real.
FAILING_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
}
GRPC_EXAMPLES_PER_METHOD = 20


def cheap_message(request: Message) -> Message:
    """`request` with its token counts and alternatives capped (CAPS), and a small token limit
    where it sets none, as `cheap` does for JSON."""
    fields = request.DESCRIPTOR.fields_by_name
    if "parameters" in fields:
        parameters: Any = request.parameters  # type: ignore[attr-defined]
        limits = ("max_new_tokens", "max_tokens")
        if not any(parameters.HasField(name) for name in limits):
            parameters.max_new_tokens = CAPS["max_new_tokens"]
        for name in (*limits, "num_return_sequences", "num_beams"):
            if parameters.HasField(name) and getattr(parameters, name) > CAPS[name]:
                setattr(parameters, name, CAPS[name])
    if "max_tokens" in fields:
        limits = ("max_tokens", "max_completion_tokens")
        if not any(name in fields and request.HasField(name) for name in limits):
            request.max_tokens = CAPS["max_tokens"]  # type: ignore[attr-defined]
        for name in (*limits, "n"):
            if name in fields and request.HasField(name) and getattr(request, name) > CAPS[name]:
                setattr(request, name, CAPS[name])
    return request


def fuzz_method(
    name: str, call: Any, strategy: st.SearchStrategy[Message], metadata: Any, tally: Tally
) -> None:
    """GRPC_EXAMPLES_PER_METHOD messages to one RPC; a status of FAILING_CODES is a problem."""

    @settings(FUZZED, max_examples=GRPC_EXAMPLES_PER_METHOD)
    @given(strategy)
    def send(request: Message) -> None:
        request = cheap_message(request)
        try:
            reply = call(request, metadata=metadata, timeout=60)
            for _ in reply if hasattr(reply, "__iter__") and not isinstance(reply, Message) else ():
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            details = error.details()
            if code in FAILING_CODES:
                tally.problems.append(f"gRPC {name} -> {code.name} {details!r} (sent {str(request)[:300]!r})")
        tally.grpc_codes[code.name] += 1

    send()


def test_native_grpc_messages(stack: PredictionsStack, tally: Tally) -> None:
    """The unit fuzzer's requests over native gRPC through Envoy: never INTERNAL, UNKNOWN or
    UNAVAILABLE; a bad request is INVALID_ARGUMENT (or another 4xx-like status)."""
    before = len(tally.problems)
    metadata = stack.gateway.metadata("user")
    with grpc.insecure_channel(stack.grpc_address) as channel:
        generation = generation_pb2_grpc.GenerationServiceStub(channel)
        embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        openai = openai_pb2_grpc.OpenAIServiceStub(channel)
        predictions = predictions_pb2_grpc.PredictionServiceStub(channel)
        served = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
            info_pb2.ListServedModelsRequest(), metadata=metadata, timeout=30
        )
        models = [*sorted(model.id for model in served.models), "nope"]
        methods: list[tuple[str, Any, st.SearchStrategy[Any]]] = [
            ("Generate", generation.Generate, fuzz.fuzzed(fuzz.GENERATE)),
            ("GenerateStream", generation.GenerateStream, fuzz.fuzzed(fuzz.GENERATE_STREAM)),
            ("Chat", generation.Chat, fuzz.fuzzed(fuzz.CHAT)),
            ("SolveMath", generation.SolveMath, fuzz.fuzzed(generation_pb2.SolveMathRequest(problem="1+1"))),
            ("Embed", embedding.Embed, fuzz.fuzzed(fuzz.EMBED)),
            ("CreateChatCompletion", openai.CreateChatCompletion, fuzz.fuzzed(fuzz.CHAT_COMPLETION)),
            ("CreateCompletion", openai.CreateCompletion, fuzz.fuzzed(fuzz.COMPLETION)),
            ("CreateEmbedding", openai.CreateEmbedding, fuzz.fuzzed(fuzz.OPENAI_EMBEDDING)),
            ("CreatePrediction", predictions.CreatePrediction, prediction_requests(models)),
        ]
        for name, call, strategy in methods:
            tally.operations.add(f"gRPC {name}")
            fuzz_method(name, call, strategy, metadata, tally)
    assert tally.problems[before:] == [], "\n".join(tally.problems[before:][:20])


def prediction_requests(models: list[str]) -> st.SearchStrategy[predictions_pb2.CreatePredictionRequest]:
    """CreatePrediction requests for a served model (or none) with the unit fuzzer's inputs."""

    def build(model: str, case: tuple[str, dict[str, Any]]) -> predictions_pb2.CreatePredictionRequest:
        request = predictions_pb2.CreatePredictionRequest(model=model)
        fuzz.to_struct(cheap("/v1/predictions", {"input": case[1]})["input"], request.input)
        return request

    return st.builds(build, st.sampled_from(models), fuzz.prediction_inputs())
