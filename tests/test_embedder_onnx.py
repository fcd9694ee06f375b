"""The ONNX Runtime backend serves the same vectors as SentenceTransformer.encode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inference.v1 import embedding_pb2_grpc

from tests.fixtures_embedder import EmbedderHandle, embed_request, start_embedder

TIMEOUT = 60.0
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "short",
    "A longer sentence about serving sentence embeddings from ONNX Runtime behind gRPC.",
    " ".join(f"word{i}" for i in range(400)),
]


@pytest.fixture(scope="module")
def onnx_embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbedderHandle]:
    onnx_dir = tmp_path_factory.mktemp("onnx")
    handle = start_embedder("--backend", "onnx", "--onnx-dir", str(onnx_dir))
    yield handle
    handle.process.stop()
    assert list(Path(onnx_dir).rglob("model.onnx")), "no ONNX export was written"


async def test_onnx_backend_matches_encode_for_texts_and_token_ids(
    onnx_embedder: EmbedderHandle, embedding_reference_model: Any
) -> None:
    expected = embedding_reference_model.encode(TEXTS, convert_to_numpy=True)
    ids = [embedding_reference_model.tokenizer(text)["input_ids"][:256] for text in TEXTS[:3]]
    async with grpc.aio.insecure_channel(onnx_embedder.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        reply = await stub.Embed(embed_request(TEXTS, truncate=True), timeout=TIMEOUT)
        from_ids = await stub.Embed(embed_request(ids), timeout=TIMEOUT)
    served = np.array([list(item.embedding) for item in reply.data], dtype=np.float32)
    assert (served * expected).sum(axis=1).min() > 0.9999
    served_ids = np.array([list(item.embedding) for item in from_ids.data], dtype=np.float32)
    assert (served_ids * served[:3]).sum(axis=1).min() > 0.99999
