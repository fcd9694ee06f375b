"""The model cache: preload, status, clear, counters, and LRU eviction by count and by memory with
two real model folders."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from inference.v1 import embedding_pb2, embedding_pb2_grpc

from tests.fixtures_embedder import (
    DEFAULT_EMBEDDING_MODEL,
    EmbedderHandle,
    copy_model_folder,
    default_embedding_folder,
    embed_request,
    start_embedder,
)

TIMEOUT = 60.0


async def cache_names(stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub) -> list[str]:
    status = await stub.GetCacheStatus(embedding_pb2.GetCacheStatusRequest(), timeout=TIMEOUT)
    return [model.name for model in status.models]


async def test_preload_then_status_shows_it_loaded_and_clear_unloads_it(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, second_model_folder: Path
) -> None:
    second = str(second_model_folder)
    reply = await embedding_stub.PreloadModels(
        embedding_pb2.PreloadModelsRequest(models=[second]), timeout=TIMEOUT
    )
    assert list(reply.accepted) == [second]
    for _ in range(300):
        status = await embedding_stub.GetCacheStatus(embedding_pb2.GetCacheStatusRequest(), timeout=TIMEOUT)
        if second in [model.name for model in status.models]:
            break
        assert second in status.loading
        await asyncio.sleep(0.1)
    loaded = {model.name: model for model in status.models}
    assert second in loaded and DEFAULT_EMBEDDING_MODEL in loaded
    assert loaded[second].dimensions == 384 and loaded[second].max_seq_length == 256
    assert 80 < loaded[second].size_mib < 100
    assert loaded[second].device == "cpu" and loaded[second].loaded_at > 0
    assert status.strategy == "fixed_size" and status.max_models >= 2

    embedded = await embedding_stub.Embed(
        embed_request("via the preloaded copy", model=second), timeout=TIMEOUT
    )
    assert embedded.model == second
    status = await embedding_stub.GetCacheStatus(embedding_pb2.GetCacheStatusRequest(), timeout=TIMEOUT)
    assert {model.name: model for model in status.models}[second].hits == 1

    cleared = await embedding_stub.ClearCache(
        embedding_pb2.ClearCacheRequest(models=[second]), timeout=TIMEOUT
    )
    assert list(cleared.cleared) == [second]
    assert await cache_names(embedding_stub) == [DEFAULT_EMBEDDING_MODEL]


async def test_clear_without_names_empties_the_cache_and_the_default_reloads_on_use(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    cleared = await embedding_stub.ClearCache(embedding_pb2.ClearCacheRequest(), timeout=TIMEOUT)
    assert DEFAULT_EMBEDDING_MODEL in cleared.cleared
    assert await cache_names(embedding_stub) == []
    reply = await embedding_stub.Embed(embed_request("load me again"), timeout=TIMEOUT)
    assert reply.model == DEFAULT_EMBEDDING_MODEL and len(reply.data[0].embedding) == 384
    assert await cache_names(embedding_stub) == [DEFAULT_EMBEDDING_MODEL]


async def test_model_counter_counts_requests_inputs_tokens_and_errors(
    embedding_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub,
) -> None:
    request = embedding_pb2.GetModelCounterRequest(model="all-MiniLM-L6-v2")
    before = await embedding_stub.GetModelCounter(request, timeout=TIMEOUT)
    assert before.model == DEFAULT_EMBEDDING_MODEL
    reply = await embedding_stub.Embed(embed_request(["one", "two", "three"]), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError):
        await embedding_stub.Embed(embed_request("x", dimensions=999), timeout=TIMEOUT)
    after = await embedding_stub.GetModelCounter(request, timeout=TIMEOUT)
    assert after.requests - before.requests == 2
    assert after.inputs - before.inputs == 3
    assert after.tokens - before.tokens == reply.usage.prompt_tokens
    assert after.errors - before.errors == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embedding_stub.GetModelCounter(
            embedding_pb2.GetModelCounterRequest(model="no-such-org/no-such-model"), timeout=TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def fixed_size_embedder() -> Iterator[EmbedderHandle]:
    handle = start_embedder("--cache-strategy", "fixed_size", "--max-models", "1")
    yield handle
    handle.process.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def fixed_size_stub(
    fixed_size_embedder: EmbedderHandle,
) -> AsyncIterator[embedding_pb2_grpc.EmbeddingServiceAsyncStub]:
    async with grpc.aio.insecure_channel(fixed_size_embedder.address) as channel:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel)


async def test_fixed_size_cache_evicts_the_least_recently_used_model(
    fixed_size_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, second_model_folder: Path
) -> None:
    second = str(second_model_folder)
    assert await cache_names(fixed_size_stub) == [DEFAULT_EMBEDDING_MODEL]
    reply = await fixed_size_stub.Embed(embed_request("second model", model=second), timeout=TIMEOUT)
    assert reply.model == second
    status = await fixed_size_stub.GetCacheStatus(embedding_pb2.GetCacheStatusRequest(), timeout=TIMEOUT)
    assert [model.name for model in status.models] == [second]
    assert status.evictions == 1 and status.max_models == 1
    reply = await fixed_size_stub.Embed(embed_request("default again"), timeout=TIMEOUT)
    assert reply.model == DEFAULT_EMBEDDING_MODEL
    status = await fixed_size_stub.GetCacheStatus(embedding_pb2.GetCacheStatusRequest(), timeout=TIMEOUT)
    assert [model.name for model in status.models] == [DEFAULT_EMBEDDING_MODEL]
    assert status.evictions == 2


@pytest.fixture(scope="module")
def memory_aware_embedder() -> Iterator[EmbedderHandle]:
    # all-MiniLM-L6-v2 holds about 87 MiB: one fits in 150 MiB, two do not.
    handle = start_embedder(
        "--cache-strategy", "memory_aware", "--memory-budget-mib", "150", "--memory-safety-margin-mib", "64"
    )
    yield handle
    handle.process.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def memory_aware_stub(
    memory_aware_embedder: EmbedderHandle,
) -> AsyncIterator[embedding_pb2_grpc.EmbeddingServiceAsyncStub]:
    async with grpc.aio.insecure_channel(memory_aware_embedder.address) as channel:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel)


async def test_memory_aware_cache_evicts_to_stay_within_the_budget(
    memory_aware_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, second_model_folder: Path
) -> None:
    second = str(second_model_folder)
    reply = await memory_aware_stub.Embed(embed_request("second model", model=second), timeout=TIMEOUT)
    assert reply.model == second
    status = await memory_aware_stub.GetCacheStatus(embedding_pb2.GetCacheStatusRequest(), timeout=TIMEOUT)
    assert status.strategy == "memory_aware"
    assert [model.name for model in status.models] == [second]
    assert status.evictions == 1
    assert status.memory_budget_mib == 150
    assert 0 < status.memory_used_mib <= status.memory_budget_mib


async def test_memory_aware_cache_refuses_a_model_larger_than_the_budget(
    memory_aware_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, tmp_path: Path
) -> None:
    big = copy_model_folder(default_embedding_folder(), tmp_path / "big")
    with (big / "extra.safetensors").open("wb") as extra:
        extra.truncate(200 * 1024 * 1024)  # sparse: counts toward the size, costs no disk
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await memory_aware_stub.Embed(embed_request("too big", model=str(big)), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory budget is 150 MiB" in (caught.value.details() or "")
    # Nothing was evicted for a model that could never fit.
    assert len(await cache_names(memory_aware_stub)) == 1


async def test_sigterm_lets_a_running_request_finish_then_exits_cleanly(
    memory_aware_embedder: EmbedderHandle, memory_aware_stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub
) -> None:
    texts = [f"document {i} " + "with some words " * 30 for i in range(256)]
    call = asyncio.ensure_future(memory_aware_stub.Embed(embed_request(texts), timeout=TIMEOUT))
    await asyncio.sleep(0.3)
    assert not call.done()
    os.killpg(memory_aware_embedder.process.pid, signal.SIGTERM)
    reply = await call
    assert len(reply.data) == 256
    assert memory_aware_embedder.process.process is not None
    code = await asyncio.to_thread(memory_aware_embedder.process.process.wait, 30)
    assert code == 0, memory_aware_embedder.process.log_tail()
