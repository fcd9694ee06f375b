"""presence_penalty, frequency_penalty and logit_bias over the real stack (Envoy, gateway, generator
with the default model), greedy so that every output is exact: each changes the output in its
documented direction, and bad values are a 400 naming the field on native REST, the OpenAI SDK
and gRPC."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import grpc
import httpx2
import openai
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from inference_client import InferenceClient, InvalidArgumentError
from openai import OpenAI

from tests.fixtures_gateway import GatewayService

TIMEOUT = 180.0
# The default model continues this prompt with "-to-many" over and over when greedy.
REPEATING = "one one one one one one one one"
FRANCE = "What is the capital of France?"
BEYOND_VOCABULARY = 1_000_000


@pytest.fixture(scope="module")
def stub(gateway_service: GatewayService) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(gateway_service.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers(), timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(openai_sdk: OpenAI) -> OpenAI:
    return openai_sdk


@pytest.fixture(scope="module")
def chat_model(rest: httpx2.Client) -> str:
    served = rest.get("/models").json()["models"]
    return str(next(model["id"] for model in served if model["task"] == "generation"))


def greedy_tokens(
    stub: generation_pb2_grpc.GenerationServiceStub,
    gateway_service: GatewayService,
    prompt: str = "",
    chat: str = "",
    **knobs: Any,
) -> list[tuple[int, str]]:
    """(token id, text) of each token of a greedy answer streamed over the gateway's gRPC."""
    parameters = common_pb2.SamplingParameters(do_sample=False, **knobs)
    request = generation_pb2.GenerateStreamRequest(prompt=prompt, parameters=parameters)
    if chat:
        request.messages.add(role="user", content=chat)
    replies = stub.GenerateStream(request, timeout=TIMEOUT, metadata=gateway_service.metadata())
    return [(reply.token.id, reply.token.text) for reply in replies if reply.token.text or reply.token.id]


def repeats(items: list[Any]) -> int:
    """How many items repeat an earlier one."""
    return len(items) - len(set(items))


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@pytest.fixture(scope="module")
def france(
    stub: generation_pb2_grpc.GenerationServiceStub, gateway_service: GatewayService
) -> list[tuple[int, str]]:
    """(token id, text) of the greedy answer to FRANCE."""
    tokens = greedy_tokens(stub, gateway_service, chat=FRANCE, max_new_tokens=12)
    assert "".join(text for _, text in tokens) == "The capital of France is Paris."
    return tokens


def paris(tokens: list[tuple[int, str]]) -> int:
    return next(token for token, text in tokens if text.strip() == "Paris")


# --- each knob moves the output in its direction ---------------------------------------------


@pytest.mark.parametrize("knob", ["frequency_penalty", "presence_penalty"])
def test_a_positive_penalty_repeats_fewer_tokens_over_grpc(
    stub: generation_pb2_grpc.GenerationServiceStub, gateway_service: GatewayService, knob: str
) -> None:
    plain_knobs: dict[str, Any] = {"max_new_tokens": 48}
    knobs: dict[str, Any] = {**plain_knobs, knob: 2.0}
    plain = [t for t, _ in greedy_tokens(stub, gateway_service, prompt=REPEATING, **plain_knobs)]
    penalized = [t for t, _ in greedy_tokens(stub, gateway_service, prompt=REPEATING, **knobs)]
    assert len(plain) == len(penalized) == 48
    assert repeats(penalized) < repeats(plain) / 2, (repeats(penalized), repeats(plain))


def test_a_negative_frequency_penalty_repeats_more_over_native_rest(rest: httpx2.Client) -> None:
    messages = [{"role": "user", "content": "Repeat the word 'hello' twenty times."}]

    def answer(**knobs: Any) -> str:
        parameters = {"max_new_tokens": 32, "do_sample": False, **knobs}
        reply = rest.post("/generate", json={"messages": messages, "parameters": parameters})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["generated_text"])

    plain, eager = answer(), answer(frequency_penalty=-2.0)
    assert repeats(words(eager)) > repeats(words(plain)), (plain, eager)


def test_frequency_penalty_over_native_rest_repeats_fewer_words(rest: httpx2.Client) -> None:
    def answer(**knobs: Any) -> str:
        parameters = {"max_new_tokens": 48, "do_sample": False, **knobs}
        reply = rest.post("/generate", json={"prompt": REPEATING, "parameters": parameters})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["generated_text"])

    plain, penalized = answer(), answer(frequency_penalty=2.0)
    assert repeats(words(penalized)) < repeats(words(plain)) / 2, (plain, penalized)


def test_logit_bias_bans_the_first_token_and_forces_another_over_native_rest(
    rest: httpx2.Client, france: list[tuple[int, str]]
) -> None:
    def answer(bias: dict[str, float]) -> str:
        parameters = {"max_new_tokens": 12, "do_sample": False, "logit_bias": bias}
        body = {"messages": [{"role": "user", "content": FRANCE}], "parameters": parameters}
        reply = rest.post("/generate", json=body)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["generated_text"])

    plain = answer({})
    assert plain == "The capital of France is Paris."
    first, first_text = france[0]
    banned = answer({str(first): -100.0})
    assert banned != plain and not banned.startswith(first_text), banned
    forced = answer({str(paris(france)): 100.0})
    assert forced.count("Paris") == 12, forced


def test_the_openai_sdk_honours_penalties_and_logit_bias(
    sdk: OpenAI, chat_model: str, france: list[tuple[int, str]]
) -> None:
    def completion(**knobs: Any) -> str:
        reply = sdk.completions.create(
            model=chat_model, prompt=REPEATING, temperature=0, max_tokens=48, **knobs
        )
        return str(reply.choices[0].text)

    plain = completion()
    for knob in ("frequency_penalty", "presence_penalty"):
        penalized = completion(**{knob: 2.0})
        assert repeats(words(penalized)) < repeats(words(plain)), (knob, plain, penalized)

    def chat(bias: dict[str, int]) -> str:
        reply = sdk.chat.completions.create(
            model=chat_model,
            messages=[{"role": "user", "content": FRANCE}],
            temperature=0,
            max_tokens=6,
            logit_bias=bias,
        )
        return str(reply.choices[0].message.content or "")

    first, first_text = france[0]
    plain_chat = chat({})
    assert plain_chat.startswith(first_text) and "capital" in plain_chat, plain_chat
    assert not chat({str(first): -100}).startswith(first_text)
    assert chat({str(paris(france)): 100}).count("Paris") == 6


def test_the_typed_client_sends_the_penalties_and_logit_bias(
    gateway_service: GatewayService, france: list[tuple[int, str]]
) -> None:
    with InferenceClient(
        gateway_service.address, api_key=gateway_service.keys["user"], timeout=TIMEOUT
    ) as client:
        forced = client.chat([("user", FRANCE)], max_new_tokens=5, logit_bias={paris(france): 100.0})
        assert forced.message.content.count("Paris") == 5
        plain = client.generate(REPEATING, max_new_tokens=48).text
        penalized = client.generate(
            REPEATING, max_new_tokens=48, frequency_penalty=2.0, presence_penalty=1.0
        ).text
        assert repeats(words(penalized)) < repeats(words(plain)), (plain, penalized)
        with pytest.raises(InvalidArgumentError) as caught:
            client.generate(FRANCE, max_new_tokens=4, presence_penalty=-2.5)
    assert [v.field for v in caught.value.field_violations] == ["parameters.presence_penalty"]


# --- bad values are a 400 naming the field ---------------------------------------------------


def bad_fields(error: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {item.field for item in bad.field_violations}
    return fields


@pytest.mark.parametrize(
    ("knobs", "fields"),
    [
        (
            {"presence_penalty": 2.5, "frequency_penalty": -3.0},
            {"parameters.presence_penalty", "parameters.frequency_penalty"},
        ),
        ({"logit_bias": {7: 100.5}}, {"parameters.logit_bias[7]"}),
        ({"logit_bias": {BEYOND_VOCABULARY: 1.0}}, {f"parameters.logit_bias[{BEYOND_VOCABULARY}]"}),
        ({"num_beams": 2, "logit_bias": {7: 1.0}}, {"parameters.logit_bias"}),
    ],
)
def test_bad_values_are_invalid_argument_naming_the_field_over_grpc(
    stub: generation_pb2_grpc.GenerationServiceStub,
    gateway_service: GatewayService,
    knobs: dict[str, Any],
    fields: set[str],
) -> None:
    request = generation_pb2.GenerateRequest(
        prompt=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=4, **knobs)
    )
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(request, timeout=TIMEOUT, metadata=gateway_service.metadata())
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(failed.value) == fields


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        ({"presence_penalty": 3.0}, "parameters.presence_penalty"),
        ({"logit_bias": {"5": -150}}, "parameters.logit_bias[5]"),
        ({"logit_bias": {str(BEYOND_VOCABULARY): 1}}, f"parameters.logit_bias[{BEYOND_VOCABULARY}]"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "parameters.logit_bias"),
    ],
)
def test_bad_values_are_a_400_naming_the_field_over_native_rest(
    rest: httpx2.Client, knobs: dict[str, Any], field: str
) -> None:
    reply = rest.post("/generate", json={"prompt": FRANCE, "parameters": {"max_new_tokens": 4, **knobs}})
    assert reply.status_code == 400, reply.text
    assert f"{field}:" in reply.json()["message"]


@pytest.mark.parametrize(
    ("knobs", "text"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias[5]"),
        ({"logit_bias": {str(BEYOND_VOCABULARY): 1}}, f"logit_bias[{BEYOND_VOCABULARY}]"),
    ],
)
def test_bad_values_are_a_400_naming_the_field_over_the_openai_sdk(
    sdk: OpenAI, chat_model: str, knobs: dict[str, Any], text: str
) -> None:
    with pytest.raises(openai.BadRequestError) as failed:
        sdk.chat.completions.create(
            model=chat_model, messages=[{"role": "user", "content": FRANCE}], max_tokens=4, **knobs
        )
    assert text in str(failed.value)
