"""The typed client's output constraints against a real generator (SmolLM2-135M): a pydantic
model as json_schema comes back as a validated instance, on generate, chat and the asyncio
client; choice and regex hold."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Literal

import pytest
from inference_client import AsyncInferenceClient, FinishReason, InferenceClient
from pydantic import BaseModel, ConfigDict, Field

TIMEOUT = 120.0
ASK = [("user", "Describe a city in France as JSON.")]


class Address(BaseModel):
    # Closed objects (additionalProperties false): a small model wanders off into extra keys.
    model_config = ConfigDict(extra="forbid")
    street: str = Field(max_length=16)
    zip: int = Field(ge=10000, le=99999)


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10_000_000)
    kind: Literal["capital", "town", "village"]
    address: Address


@pytest.fixture(scope="module")
def client(generator_address: str) -> Iterator[InferenceClient]:
    with InferenceClient(generator_address, timeout=TIMEOUT) as client:
        yield client


def test_a_model_class_comes_back_as_a_validated_instance(client: InferenceClient) -> None:
    result = client.generate(messages=ASK, json_schema=City, max_new_tokens=120)
    assert result.finish_reason is FinishReason.CONSTRAINT_COMPLETE
    assert isinstance(result.parsed, City)
    assert result.parsed == City.model_validate_json(result.text)
    reply = client.chat(ASK, json_schema=City, max_new_tokens=120, temperature=0.8, seed=3)
    assert isinstance(reply.parsed, City)


def test_a_dict_schema_and_json_object_parse(client: InferenceClient) -> None:
    result = client.chat(ASK, json_schema=City.model_json_schema(), max_new_tokens=120)
    assert isinstance(result.parsed, dict) and City.model_validate(result.parsed)
    question = [("user", "Give the capital of France as a JSON object.")]
    any_object = client.chat(question, json_object=True, max_new_tokens=120)
    assert isinstance(any_object.parsed, dict)


def test_choice_returns_one_of_the_choices(client: InferenceClient) -> None:
    choices = ["Paris", "Lyon", "Marseille"]
    reply = client.chat([("user", "What is the capital of France?")], choice=choices, max_new_tokens=16)
    assert reply.text in choices and reply.finish_reason is FinishReason.CONSTRAINT_COMPLETE
    sampled = client.generate("Pick a color:", choice=["red", "green", "blue"], temperature=1.0, seed=7)
    assert sampled.text in ("red", "green", "blue") and sampled.parsed is None


def test_regex_holds(client: InferenceClient) -> None:
    # [0-9], not \d: llguidance's \d is Unicode's, and the model then wanders into exotic digits.
    date = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
    result = client.generate(messages=[("user", "Give a date.")], regex=date, max_new_tokens=24)
    assert re.fullmatch(date, result.text) and result.finish_reason is FinishReason.CONSTRAINT_COMPLETE


def test_the_asyncio_client_parses_too(generator_address: str) -> None:
    async def ask() -> object:
        async with AsyncInferenceClient(generator_address, timeout=TIMEOUT) as client:
            return (await client.generate(messages=ASK, json_schema=City, max_new_tokens=120)).parsed

    assert isinstance(asyncio.run(ask()), City)
