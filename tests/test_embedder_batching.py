"""Dynamic batching across requests: concurrent callers share forward passes and each gets its
own vector back; cancelled requests drop out of the queue; admission is bounded."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]
from inference.v1 import embedding_pb2_grpc, info_pb2, info_pb2_grpc

from tests.fixtures_embedder import EmbedderHandle, embed_request, start_embedder, status_details

TIMEOUT = 60.0


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_64_concurrent_one_text_callers_each_get_their_own_vector_in_shared_batches(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
    embedder_service: EmbedderHandle,
    embedding_reference_model: Any,
) -> None:
    texts = [f"Caller number {i} asks about topic {i * 7 % 13} and nothing else." for i in range(64)]
    count_before = metric(embedder_service.metrics_port, "embedder_batch_size_count")
    sum_before = metric(embedder_service.metrics_port, "embedder_batch_size_sum")
    replies = await asyncio.gather(
        *(embedding_stub.Embed(embed_request(text), timeout=TIMEOUT) for text in texts)
    )
    served = np.array([list(reply.data[0].embedding) for reply in replies], dtype=np.float32)
    expected = embedding_reference_model.encode(texts, convert_to_numpy=True)
    similarity = served @ expected.T
    # Each caller's vector is its own text's (and not a neighbour's, which would be close too).
    assert np.all(np.argmax(similarity, axis=1) == np.arange(64))
    assert np.diag(similarity).min() > 0.9999
    batches = metric(embedder_service.metrics_port, "embedder_batch_size_count") - count_before
    inputs = metric(embedder_service.metrics_port, "embedder_batch_size_sum") - sum_before
    assert inputs == 64
    assert batches < 64 / 2, f"{batches} forward passes for 64 one-text requests: no batching"


async def test_a_cancelled_request_leaves_the_queue(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
    embedder_info_stub: info_pb2_grpc.InfoServiceAsyncStub,
    embedder_service: EmbedderHandle,
) -> None:
    long_texts = [f"{i} " + "tokens of a long document " * 40 for i in range(2048)]
    inputs_before = metric(embedder_service.metrics_port, "embedder_batch_size_sum")
    call = embedding_stub.Embed(embed_request(long_texts), timeout=TIMEOUT)
    task = asyncio.ensure_future(call)
    await asyncio.sleep(1.0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    reply = await embedding_stub.Embed(embed_request("after the cancel"), timeout=TIMEOUT)
    assert len(reply.data) == 1
    assert time.monotonic() - started < 20.0
    for _ in range(50):
        stats = await embedder_info_stub.GetStats(info_pb2.GetStatsRequest(), timeout=TIMEOUT)
        if stats.components[0].requests_running == 0 and stats.components[0].requests_waiting == 0:
            break
        await asyncio.sleep(0.1)
    assert stats.components[0].requests_running == 0
    assert stats.components[0].requests_waiting == 0
    embedded = metric(embedder_service.metrics_port, "embedder_batch_size_sum") - inputs_before
    assert embedded < 2048, "the cancelled request's inputs were still embedded"


@pytest.fixture(scope="module")
def small_admission_embedder() -> Iterator[EmbedderHandle]:
    handle = start_embedder("--max-pending-inputs", "8", "--max-inputs-per-request", "8")
    yield handle
    handle.process.stop()


async def test_over_capacity_is_resource_exhausted_with_retry_info(
    small_admission_embedder: EmbedderHandle,
) -> None:
    texts = ["a long input for admission control " * 20] * 8
    async with grpc.aio.insecure_channel(small_admission_embedder.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        results = await asyncio.gather(
            *(stub.Embed(embed_request(texts), timeout=TIMEOUT) for _ in range(16)), return_exceptions=True
        )
        refused = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
        served = [result for result in results if not isinstance(result, BaseException)]
        assert served, results
        assert refused, "16 concurrent requests of 8 inputs fit a bound of 8 pending inputs"
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            retry = [d for d in status_details(error) if isinstance(d, error_details_pb2.RetryInfo)]
            assert retry and retry[0].retry_delay.ToTimedelta().total_seconds() > 0
        # Capacity comes back once the burst is over.
        reply = await stub.Embed(embed_request(texts), timeout=TIMEOUT)
        assert len(reply.data) == 8


@pytest.mark.parametrize(
    ("lengths", "max_batch_size", "max_batch_tokens"),
    [
        ([17, 3, 45, 30, 8, 22, 40, 12] * 8, 64, 16384),
        ([256] * 100, 64, 16384),
        ([256] * 10 + [5] * 50, 32, 2048),
        ([600], 64, 256),
    ],
)
def test_batches_are_sorted_and_respect_size_and_token_budget(
    lengths: list[int], max_batch_size: int, max_batch_tokens: int
) -> None:
    from services.embedder.batcher import DynamicBatcher, _Item, _Request

    batcher = DynamicBatcher(max_batch_size, max_batch_tokens, 0.002)
    loop = asyncio.new_event_loop()
    try:
        request = _Request(future=loop.create_future(), count=len(lengths))
        items = [_Item([1] * length, request, position, 0.0) for position, length in enumerate(lengths)]
        batches = batcher._split(list(items))
    finally:
        loop.close()
    flat = [item for batch in batches for item in batch]
    assert sorted(item.position for item in flat) == list(range(len(lengths)))
    assert [len(item.ids) for item in flat] == sorted(lengths)
    for batch in batches:
        assert len(batch) <= max_batch_size
        longest = max(len(item.ids) for item in batch)
        assert len(batch) == 1 or len(batch) * longest <= max_batch_tokens
    padded = sum(len(batch) * max(len(item.ids) for item in batch) for batch in batches)
    one_pass = len(lengths) * max(lengths)
    if len(lengths) <= max_batch_size and one_pass <= max_batch_tokens:
        assert padded <= one_pass
