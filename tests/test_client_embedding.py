"""The typed client against a real embedder process: vectors in both encodings, token-id input,
dimensions, field violations from the server's details, health and models, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from inference_client import (
    AsyncInferenceClient,
    InferenceClient,
    InvalidArgumentError,
    ServingStatus,
)

from tests.stack import ROOT

TIMEOUT = 30.0
CLI = Path(sys.executable).parent / "inference-client"


@pytest.fixture(scope="module")
def client(embedder_address: str) -> Iterator[InferenceClient]:
    with InferenceClient(embedder_address, timeout=TIMEOUT) as client:
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embed_float_and_base64_give_the_same_vectors(client: InferenceClient) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]

    as_floats = client.embed(texts, encoding_format="float")
    as_bytes = client.embed(texts, encoding_format="base64")

    assert len(as_floats.vectors) == 2
    assert as_floats.dimensions == 384 == len(as_floats.vectors[0])
    # float32 on the wire both ways: the decoded bytes must be the very same numbers.
    assert as_bytes.vectors == as_floats.vectors
    assert math.isclose(math.fsum(x * x for x in as_floats.vectors[0]), 1.0, rel_tol=1e-4)
    assert cosine(as_floats.vectors[0], as_floats.vectors[1]) < 0.5


def test_embed_single_string_returns_one_vector(client: InferenceClient) -> None:
    single = client.embed("Paris is the capital of France.")
    batch = client.embed(["Paris is the capital of France."])

    assert len(single.vectors) == 1
    assert cosine(single.vectors[0], batch.vectors[0]) > 0.9999


def test_embed_dimensions_and_normalize(client: InferenceClient) -> None:
    short = client.embed("hello world", dimensions=64, encoding_format="base64")
    raw = client.embed("hello world", normalize=False)

    assert short.dimensions == 64 and len(short.vectors[0]) == 64
    assert math.isclose(math.fsum(x * x for x in short.vectors[0]), 1.0, rel_tol=1e-4)
    assert not math.isclose(math.fsum(x * x for x in raw.vectors[0]), 1.0, rel_tol=1e-3)


def test_embed_token_ids_match_the_text(client: InferenceClient) -> None:
    # all-MiniLM-L6-v2's WordPiece ids of "[CLS] hello world [SEP]".
    from_ids = client.embed([[101, 7592, 2088, 102]])
    from_text = client.embed("hello world")

    assert from_ids.prompt_tokens == 4
    assert cosine(from_ids.vectors[0], from_text.vectors[0]) > 0.999


def test_embed_too_many_dimensions_raises_invalid_argument_naming_the_field(client: InferenceClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.embed("hello", dimensions=100_000)

    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in error.field_violations] == ["dimensions"]
    assert "384" in error.field_violations[0].description


def test_health_and_models_of_the_embedder(client: InferenceClient) -> None:
    health = client.health()
    models = client.models()

    assert health.serving and health.status is ServingStatus.SERVING
    assert health.components[0].device.type == "cpu"
    assert health.components[0].memory.process_rss_mib > 0
    assert any(model.task == "embedding" and model.dimensions == 384 for model in models)


async def test_async_client_embeds_like_the_sync_client(
    client: InferenceClient, embedder_address: str
) -> None:
    async with AsyncInferenceClient(embedder_address, timeout=TIMEOUT) as async_client:
        result = await async_client.embed(["one", "two"], encoding_format="base64")
        health = await async_client.health()

    assert result.vectors == client.embed(["one", "two"]).vectors
    assert health.serving


def test_cli_embed_prints_the_vectors_as_json(client: InferenceClient, embedder_address: str) -> None:
    completed = subprocess.run(
        [str(CLI), "embed", "hello world", "--address", embedder_address, "--dimensions", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    assert printed["dimensions"] == 8
    expected = client.embed("hello world", dimensions=8).vectors
    assert len(printed["vectors"]) == 1
    assert printed["vectors"][0] == pytest.approx(expected[0], abs=1e-5)


def test_cli_reports_the_field_violation_and_fails(embedder_address: str) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_client",
            "embed",
            "x",
            "--address",
            embedder_address,
            "--dimensions",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 1
    assert "INVALID_ARGUMENT" in completed.stderr
    assert "dimensions:" in completed.stderr
