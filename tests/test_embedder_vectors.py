"""Served vectors against in-process SentenceTransformer.encode of the same inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from inference.v1 import embedding_pb2, embedding_pb2_grpc

from tests.fixtures_embedder import DEFAULT_EMBEDDING_MODEL, embed_request

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading and trailing spaces  ",
    "Ünïcödé and emoji 🚀 work too",
    "short",
    "A somewhat longer sentence about gRPC microservices that serve embeddings with dynamic batching.",
]
TIMEOUT = 30.0


def vectors(reply: embedding_pb2.EmbedResponse) -> npt.NDArray[np.float32]:
    assert [item.index for item in reply.data] == list(range(len(reply.data)))
    return np.array([list(item.embedding) for item in reply.data], dtype=np.float32)


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    dot = (a * b).sum(axis=1)
    result: npt.NDArray[np.float64] = dot / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


async def test_served_vectors_match_sentence_transformers_encode(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, embedding_reference_model: Any
) -> None:
    reply = await embedding_stub.Embed(embed_request(TEXTS), timeout=TIMEOUT)
    expected = embedding_reference_model.encode(TEXTS, convert_to_numpy=True)
    served = vectors(reply)
    assert served.shape == expected.shape == (len(TEXTS), 384)
    assert cosines(served, expected).min() > 0.9999
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert reply.model == DEFAULT_EMBEDDING_MODEL
    assert reply.dimensions == 384
    tokens = sum(len(ids) for ids in embedding_reference_model.tokenizer(TEXTS)["input_ids"])
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens


async def test_one_string_input_gives_one_vector_equal_to_encode(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, embedding_reference_model: Any
) -> None:
    reply = await embedding_stub.Embed(embed_request(TEXTS[0], model="all-MiniLM-L6-v2"), timeout=TIMEOUT)
    expected = embedding_reference_model.encode([TEXTS[0]], convert_to_numpy=True)
    assert len(reply.data) == 1
    assert cosines(vectors(reply), expected)[0] > 0.9999


async def test_base64_decodes_to_the_same_little_endian_floats(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    floats = await embedding_stub.Embed(embed_request(TEXTS), timeout=TIMEOUT)
    packed = await embedding_stub.Embed(
        embed_request(TEXTS, encoding_format=embedding_pb2.ENCODING_FORMAT_BASE64), timeout=TIMEOUT
    )
    for as_float, as_bytes in zip(floats.data, packed.data, strict=True):
        assert not as_bytes.embedding and len(as_bytes.embedding_bytes) == 384 * 4
        decoded = np.frombuffer(as_bytes.embedding_bytes, dtype="<f4")
        assert np.array_equal(decoded, np.array(as_float.embedding, dtype=np.float32))


async def test_token_id_input_equals_the_text_it_came_from(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, embedding_reference_model: Any
) -> None:
    tokenizer = embedding_reference_model.tokenizer
    text_reply = await embedding_stub.Embed(embed_request(TEXTS[:3]), timeout=TIMEOUT)
    expected = vectors(text_reply)
    with_special = [tokenizer(text)["input_ids"] for text in TEXTS[:3]]
    without_special = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS[:3]]
    for id_lists in (with_special, without_special):
        reply = await embedding_stub.Embed(embed_request(id_lists), timeout=TIMEOUT)
        assert cosines(vectors(reply), expected).min() > 0.99999
        assert reply.usage.prompt_tokens == text_reply.usage.prompt_tokens
    single = await embedding_stub.Embed(embed_request(without_special[0]), timeout=TIMEOUT)
    assert len(single.data) == 1
    assert cosines(vectors(single), expected[:1])[0] > 0.99999


async def test_dimensions_truncate_then_renormalize(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    full = vectors(await embedding_stub.Embed(embed_request(TEXTS), timeout=TIMEOUT))
    reply = await embedding_stub.Embed(embed_request(TEXTS, dimensions=64), timeout=TIMEOUT)
    short = vectors(reply)
    assert reply.dimensions == 64 and short.shape == (len(TEXTS), 64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert np.allclose(short, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)


async def test_normalize_false_returns_the_raw_pooled_vectors(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, embedding_reference_model: Any
) -> None:
    reply = await embedding_stub.Embed(embed_request(TEXTS, normalize=False), timeout=TIMEOUT)
    raw = vectors(reply)
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.01), norms
    expected = embedding_reference_model.encode(TEXTS, convert_to_numpy=True)
    assert cosines(raw, expected).min() > 0.9999


async def test_truncate_cuts_long_inputs_to_the_models_maximum_like_encode(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, embedding_reference_model: Any
) -> None:
    long_text = " ".join(f"word{i}" for i in range(600))
    reply = await embedding_stub.Embed(
        embed_request([long_text, "short one"], truncate=True), timeout=TIMEOUT
    )
    expected = embedding_reference_model.encode([long_text, "short one"], convert_to_numpy=True)
    assert cosines(vectors(reply), expected).min() > 0.9999
    assert reply.usage.prompt_tokens == 256 + len(
        embedding_reference_model.tokenizer("short one")["input_ids"]
    )
