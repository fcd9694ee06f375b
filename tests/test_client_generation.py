"""The typed client against a real generator process with the default model (SmolLM2-135M):
unary and streamed generation agree, chat, deadlines, field violations, and the CLI streaming
real tokens as they arrive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from inference_client import (
    AsyncInferenceClient,
    DeadlineExceededError,
    FinishReason,
    InferenceClient,
    InvalidArgumentError,
)

from tests.stack import ROOT

TIMEOUT = 120.0
QUESTION = [("user", "What is the capital of France?")]
# Through the chat template the model writes until max_new_tokens; as a raw prompt this text
# makes it stop at once, which a quiet machine answers inside any short deadline.
LONG_STORY = [("user", "Write a long story about a dragon.")]


@pytest.fixture(scope="module")
def client(generator_address: str) -> Iterator[InferenceClient]:
    with InferenceClient(generator_address, timeout=TIMEOUT) as client:
        yield client


def test_generate_answers_with_the_default_model(client: InferenceClient) -> None:
    result = client.generate(messages=QUESTION, max_new_tokens=16)

    assert "Paris" in result.text
    assert 0 < result.tokens_generated <= 16
    assert result.finish_reason in (FinishReason.EOS_TOKEN, FinishReason.LENGTH)
    assert result.usage.completion_tokens == result.tokens_generated
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.request_id


def test_streamed_tokens_concatenate_to_the_unary_text(client: InferenceClient) -> None:
    prompt = "The three primary colors are"
    unary = client.generate(prompt, max_new_tokens=10)

    stream = client.stream(prompt, max_new_tokens=10)
    tokens = list(stream)

    assert "".join(token.text for token in tokens) == unary.text == stream.text
    assert len([token for token in tokens if not token.special]) >= 1
    assert stream.done
    assert stream.finish_reason is unary.finish_reason
    assert stream.usage is not None
    assert stream.usage.completion_tokens == unary.tokens_generated
    assert stream.summaries[0].text == unary.text


def test_chat_returns_the_assistant_message(client: InferenceClient) -> None:
    reply = client.chat(QUESTION, max_new_tokens=16)

    assert reply.message.role == "assistant"
    assert "Paris" in reply.text
    assert reply.tokens_generated > 0


def test_deadline_exceeded_raises_deadline_exceeded_error(client: InferenceClient) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as caught:
        client.generate(messages=LONG_STORY, max_new_tokens=256, timeout=0.2)

    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_stream_deadline_exceeded_raises_during_iteration(client: InferenceClient) -> None:
    stream = client.stream(messages=LONG_STORY, max_new_tokens=256, timeout=0.5)
    with pytest.raises(DeadlineExceededError):
        for _ in stream:
            pass

    assert not stream.done


def test_invalid_max_new_tokens_surfaces_the_field_violation(client: InferenceClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.generate("hello", max_new_tokens=0)

    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    fields = [violation.field for violation in error.field_violations]
    assert "parameters.max_new_tokens" in fields
    assert "max_new_tokens" in error.message


async def test_async_stream_matches_async_generate(generator_address: str) -> None:
    async with AsyncInferenceClient(generator_address, timeout=TIMEOUT) as client:
        unary = await client.generate(messages=QUESTION, max_new_tokens=10)
        stream = client.stream(messages=QUESTION, max_new_tokens=10)
        pieces = [token.text async for token in stream]
        with pytest.raises(InvalidArgumentError) as caught:
            await client.generate("hello", max_new_tokens=-1)

    assert "".join(pieces) == unary.text
    assert stream.finish_reason is unary.finish_reason
    assert "parameters.max_new_tokens" in [violation.field for violation in caught.value.field_violations]


def test_leaving_a_stream_early_cancels_it_and_the_client_stays_usable(client: InferenceClient) -> None:
    with client.stream("Count from one to one hundred:", max_new_tokens=64) as stream:
        for count, _ in enumerate(stream, start=1):
            if count == 3:
                break

    assert not stream.done
    assert client.generate("Hi", max_new_tokens=2).tokens_generated >= 1


def test_cli_streams_real_tokens_as_they_arrive(client: InferenceClient, generator_address: str) -> None:
    prompt = "The capital of France is"
    expected = client.generate(prompt, max_new_tokens=10).text

    command = [sys.executable, "-m", "inference_client", "generate", prompt, "--stats"]
    process = subprocess.Popen(
        [*command, "--address", generator_address, "--max-new-tokens", "10"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    chunks: list[bytes] = []
    while chunk := os.read(process.stdout.fileno(), 4096):
        chunks.append(chunk)
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert process.wait(timeout=60) == 0, stderr

    assert b"".join(chunks).decode() == expected + "\n"
    # One write per token, flushed: the terminal sees the text grow, not one block at the end.
    assert len(chunks) >= 3
    assert "finish_reason=" in stderr
