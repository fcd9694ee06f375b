"""The official openai package against Envoy's REST port: chat and completions, plain and
streamed, embeddings (float, base64, dimensions), models, and its error types."""

from __future__ import annotations

import math

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fixtures_gateway import GatewayService

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(openai_sdk: OpenAI) -> OpenAI:
    return openai_sdk


@pytest.fixture(scope="module")
def models(client: OpenAI) -> list[str]:
    return [model.id for model in client.models.list().data]


@pytest.fixture(scope="module")
def chat_model(client: OpenAI, envoy_url: str, gateway_service: GatewayService) -> str:
    import httpx2

    served = httpx2.get(f"{envoy_url}/models", headers=gateway_service.headers(), timeout=30).json()["models"]
    return str(next(model["id"] for model in served if model["task"] == "generation"))


@pytest.fixture(scope="module")
def embedding_model(envoy_url: str, gateway_service: GatewayService) -> str:
    import httpx2

    served = httpx2.get(f"{envoy_url}/models", headers=gateway_service.headers(), timeout=30).json()["models"]
    return str(next(model["id"] for model in served if model["task"] == "embedding"))


def test_models_are_listed_and_retrieved(client: OpenAI, models: list[str], chat_model: str) -> None:
    assert chat_model in models
    model = client.models.retrieve(chat_model)
    assert model.id == chat_model and model.object == "model" and model.owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_answers_greedily(client: OpenAI, chat_model: str) -> None:
    reply = client.chat.completions.create(model=chat_model, messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streams_chunks_and_usage(client: OpenAI, chat_model: str) -> None:
    stream = client.chat.completions.create(
        model=chat_model,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Paris" in text
    finishes = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    )


def test_completion_plain_and_streamed(client: OpenAI, chat_model: str) -> None:
    reply = client.completions.create(
        model=chat_model, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens <= 4
    stream = client.completions.create(
        model=chat_model, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].text


def test_embeddings_float_and_base64_with_dimensions(client: OpenAI, embedding_model: str) -> None:
    floats = client.embeddings.create(
        model=embedding_model, input=["hello", "world"], encoding_format="float"
    )
    assert [item.index for item in floats.data] == [0, 1]
    full = len(floats.data[0].embedding)
    assert full > 64 and math.isclose(math.hypot(*floats.data[0].embedding), 1.0, rel_tol=1e-3)
    # The SDK asks for base64 by default and decodes it.
    short = client.embeddings.create(model=embedding_model, input="hello", dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert math.isclose(math.hypot(*short.data[0].embedding), 1.0, rel_tol=1e-3)
    base64 = client.embeddings.create(model=embedding_model, input=["hello"])
    assert all(
        math.isclose(a, b, abs_tol=1e-5)
        for a, b in zip(base64.data[0].embedding, floats.data[0].embedding, strict=True)
    )
    assert floats.usage.prompt_tokens > 0


def test_sdk_errors_carry_the_status_and_message(client: OpenAI, envoy_url: str, chat_model: str) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=chat_model, messages=QUESTION, temperature=5)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    stranger = OpenAI(base_url=f"{envoy_url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
