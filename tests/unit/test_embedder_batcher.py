"""The embedder's dynamic batcher over a fake model: results in input order, the padded-token
budget and batch size, the wait for more inputs, failures confined to their batch, and
cancelled callers dropping out of the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest

from services.embedder.batcher import CPU_FORWARD_OVERHEAD_TOKENS, BatchReport, DynamicBatcher
from tests.unit.fakes import FakeEmbeddingModel, eventually, expected_vector, within

BatcherFactory = Callable[..., DynamicBatcher]


@pytest.fixture
async def make_batcher() -> AsyncIterator[BatcherFactory]:
    """Started batchers, stopped afterwards."""
    batchers: list[DynamicBatcher] = []

    def build(
        max_batch_size: int = 32,
        max_batch_tokens: int = 4096,
        max_wait_s: float = 0.0,
        on_batch: Callable[[BatchReport], None] = lambda report: None,
        forward_overhead_tokens: int = CPU_FORWARD_OVERHEAD_TOKENS,
    ) -> DynamicBatcher:
        batcher = DynamicBatcher(
            max_batch_size, max_batch_tokens, max_wait_s, on_batch, forward_overhead_tokens
        )
        batcher.start()
        batchers.append(batcher)
        return batcher

    yield build
    for batcher in batchers:
        await within(batcher.stop())


def check_vectors(vectors: np.ndarray, inputs: Sequence[Sequence[int]]) -> None:
    assert vectors.shape == (len(inputs), 4)
    assert vectors.tolist() == [expected_vector(ids) for ids in inputs]


async def test_each_caller_gets_its_own_vectors_in_its_input_order(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    model = FakeEmbeddingModel()
    inputs = [[7] * 5, [3], [9, 9, 9], [1, 2]]
    check_vectors(await within(batcher.submit(model, inputs)), inputs)
    # Sorted by length inside the batch, so that the padding is small.
    assert model.batches == [[[3], [1, 2], [9, 9, 9], [7] * 5]]


async def test_inputs_queued_while_a_batch_runs_share_the_next_batch(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    model = FakeEmbeddingModel()
    model.hold()
    first = asyncio.ensure_future(batcher.submit(model, [[1]]))
    await within(asyncio.to_thread(model.entered.wait, 10))
    callers = [asyncio.ensure_future(batcher.submit(model, [[n, n]])) for n in range(2, 10)]
    await eventually(lambda: batcher.queued_inputs == 8)
    model.allow(2)
    results = await within(asyncio.gather(first, *callers))
    for n, vectors in enumerate(results[1:], start=2):
        check_vectors(vectors, [[n, n]])
    assert [len(batch) for batch in model.batches] == [1, 8]
    assert batcher.batches == 2 and batcher.batched_inputs == 9


async def test_batches_respect_the_padded_token_budget_and_the_batch_size(
    make_batcher: BatcherFactory,
) -> None:
    reports: list[BatchReport] = []
    batcher = make_batcher(max_batch_size=3, max_batch_tokens=16, on_batch=reports.append)
    model = FakeEmbeddingModel()
    inputs = [[1] * 2, [2] * 8, [3] * 2, [4] * 8, [5] * 2, [6] * 2, [7] * 20]
    check_vectors(await within(batcher.submit(model, inputs)), inputs)
    assert sorted(len(ids) for batch in model.batches for ids in batch) == sorted(len(ids) for ids in inputs)
    for batch in model.batches:
        longest = max(len(ids) for ids in batch)
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * longest <= 16
    # An input longer than the budget still runs, alone.
    assert [[7] * 20] in model.batches
    assert [(r.size, r.padded_tokens, r.tokens) for r in reports] == [
        (len(b), len(b) * max(len(ids) for ids in b), sum(len(ids) for ids in b)) for b in model.batches
    ]


async def test_a_lone_input_waits_max_wait_for_company_and_a_full_batch_does_not(
    make_batcher: BatcherFactory,
) -> None:
    model = FakeEmbeddingModel()
    waiting = make_batcher(max_batch_size=4, max_wait_s=0.5)
    started = time.monotonic()
    first = asyncio.ensure_future(waiting.submit(model, [[1]]))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(waiting.submit(model, [[2]]))
    await within(asyncio.gather(first, second))
    assert time.monotonic() - started >= 0.49
    assert model.batches == [[[1], [2]]]

    full = make_batcher(max_batch_size=4, max_wait_s=5.0)
    started = time.monotonic()
    await within(full.submit(model, [[1], [2], [3], [4]]))
    assert time.monotonic() - started < 2.5


async def test_a_failing_batch_fails_only_the_requests_in_it(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher(max_batch_tokens=10)
    model = FakeEmbeddingModel(poison=666)
    # Queued in one go, so that both are taken together and split by the budget.
    bad = asyncio.ensure_future(batcher.submit(model, [[666] * 10]))
    good = asyncio.ensure_future(batcher.submit(model, [[1, 2]]))
    with pytest.raises(ValueError, match="poisoned"):
        await within(bad)
    check_vectors(await within(good), [[1, 2]])
    # Two inputs of 10 and 2 tokens would pad to 20 > 10: two batches, one of them failed.
    assert len(model.batches) == 2
    check_vectors(await within(batcher.submit(model, [[3]])), [[3]])


async def test_a_cancelled_caller_drops_its_queued_inputs(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    model = FakeEmbeddingModel()
    model.hold()
    running = asyncio.ensure_future(batcher.submit(model, [[1]]))
    await within(asyncio.to_thread(model.entered.wait, 10))
    cancelled = asyncio.ensure_future(batcher.submit(model, [[50, 50], [51]]))
    kept = asyncio.ensure_future(batcher.submit(model, [[2, 2]]))
    await eventually(lambda: batcher.queued_inputs == 3)
    cancelled.cancel()
    model.allow(10)
    check_vectors(await within(running), [[1]])
    check_vectors(await within(kept), [[2, 2]])
    assert cancelled.cancelled()
    assert not any(ids[0] in (50, 51) for batch in model.batches for ids in batch)
    await eventually(lambda: batcher.queued_inputs == 0)


async def test_each_model_has_its_own_queue(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    one, two = FakeEmbeddingModel("one"), FakeEmbeddingModel("two")
    results = await within(
        asyncio.gather(batcher.submit(one, [[1]]), batcher.submit(two, [[2]]), batcher.submit(one, [[3]]))
    )
    for vectors, ids in zip(results, ([1], [2], [3]), strict=True):
        check_vectors(vectors, [ids])
    assert one.batches == [[[1], [3]]] and two.batches == [[[2]]]
