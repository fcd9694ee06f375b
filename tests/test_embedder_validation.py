"""Every kind of bad input gets INVALID_ARGUMENT (or NOT_FOUND) naming the field, and the server
keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from inference.v1 import embedding_pb2, embedding_pb2_grpc

from tests.fixtures_embedder import embed_request, field_violations, status_details

TIMEOUT = 30.0

BAD_INPUTS: list[tuple[str, Any, dict[str, Any], str, str]] = [
    ("missing input", None, {}, "input", "required"),
    ("empty string", "", {}, "input", "empty"),
    ("empty list", [], {}, "input", "empty"),
    ("empty string in a list", ["fine", ""], {}, "input[1]", "empty"),
    ("number among strings", ["fine", 3], {}, "input[1]", "string"),
    ("empty token list", [[101, 102], []], {}, "input[1]", "empty"),
    ("fractional token id", [101, 7592.5, 102], {}, "input[1]", "whole number"),
    ("negative token id", [[101, -4]], {}, "input[0][1]", "non-negative"),
    ("token id past the vocabulary", [[101, 999999]], {}, "input[0][1]", "vocabulary"),
    ("boolean input", [True], {}, "input[0]", "input must be"),
    ("object input", {"text": "hi"}, {}, "input", "must be a string"),
    ("string among token lists", [[101], "text"], {}, "input[1]", "list of token ids"),
    ("too many inputs", ["x"] * 2049, {}, "input", "at most 2048"),
    ("input over the sequence limit", [" ".join(["word"] * 400)], {}, "input[0]", "256"),
    ("zero dimensions", "hi", {"dimensions": 0}, "dimensions", "at least 1"),
    ("dimensions above the model's size", "hi", {"dimensions": 385}, "dimensions", "at most 384"),
    ("unknown encoding format", "hi", {"encoding_format": 7}, "encoding_format", "BASE64"),
]


@pytest.mark.parametrize(
    ("value", "fields", "field", "words"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
    value: Any,
    fields: dict[str, Any],
    field: str,
    words: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embedding_stub.Embed(embed_request(value, **fields), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    violations = field_violations(caught.value)
    assert len(violations) == 1, violations
    assert violations[0][0] == field
    assert words in violations[0][1]
    assert field in (caught.value.details() or "")


async def test_unknown_model_is_not_found(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    for name in ("no-such-org/no-such-model", "/no/such/folder", "bad name with spaces"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embedding_stub.Embed(embed_request("hi", model=name), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
        assert name in (caught.value.details() or "")
        assert status_details(caught.value), "ErrorInfo expected"


async def test_folder_that_is_not_a_model_is_not_found(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embedding_stub.Embed(embed_request("hi", model=str(tmp_path)), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "modules.json" in (caught.value.details() or "")


async def test_broken_model_folder_is_failed_precondition_with_the_reason(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, tmp_path: Path
) -> None:
    (tmp_path / "modules.json").write_text("this is not json")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embedding_stub.Embed(embed_request("hi", model=str(tmp_path)), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert "cannot be loaded" in (caught.value.details() or "")


async def test_preload_of_an_unknown_model_is_not_found_and_empty_preload_is_invalid(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embedding_stub.PreloadModels(
            embedding_pb2.PreloadModelsRequest(models=["no-such-org/no-such-model"]), timeout=TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embedding_stub.PreloadModels(embedding_pb2.PreloadModelsRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value)[0][0] == "models"


async def test_server_still_serves_after_bad_requests(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    reply = await embedding_stub.Embed(embed_request(["still", "here"]), timeout=TIMEOUT)
    assert len(reply.data) == 2
