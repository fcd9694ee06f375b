"""Dynamic batching across requests, as TEI does it: callers queue token-id sequences per model and await
one future; one task waits up to `max_wait_s` for up to `max_batch_size` inputs, splits them under the
padded-token budget and runs each batch on a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.embedder.models import EmbeddingModel

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]

# The fixed cost of one forward pass in padded tokens, which keeps the splitter from cutting
# batches too fine: on CPU a MiniLM pass costs about as much as 32 more tokens; on a GPU the
# per-token cost is tiny next to a launch, so cuts pay off only against much more padding.
CPU_FORWARD_OVERHEAD_TOKENS = 32
GPU_FORWARD_OVERHEAD_TOKENS = 2048


@dataclass
class _Request:
    future: asyncio.Future[Vectors]
    count: int
    out: Vectors | None = None
    remaining: int = 0


@dataclass
class _Item:
    ids: Sequence[int]
    request: _Request
    position: int
    enqueued_at: float


@dataclass
class _Queue:
    model: EmbeddingModel
    items: deque[_Item] = field(default_factory=deque)


@dataclass(frozen=True)
class BatchReport:
    """What one forward pass did, for metrics."""

    model: str
    size: int
    padded_tokens: int
    tokens: int
    queue_seconds: list[float]
    inference_seconds: float


class DynamicBatcher:
    def __init__(
        self,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        on_batch: Callable[[BatchReport], None] = lambda report: None,
        forward_overhead_tokens: int = CPU_FORWARD_OVERHEAD_TOKENS,
    ) -> None:
        self.forward_overhead_tokens = forward_overhead_tokens
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queues: dict[str, _Queue] = {}
        self._wakeup = asyncio.Event()
        # One thread: batches run one after another, each using all of torch's intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-model")
        self._task: asyncio.Task[None] | None = None
        self.queued_inputs = 0
        self.running_inputs = 0
        self.batches = 0
        self.batched_inputs = 0
        # Moving average of forward-pass time per input: the basis of RetryInfo's delay.
        self.seconds_per_input = 0.005

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="embedder-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for queue in self._queues.values():
            for item in queue.items:
                if not item.request.future.done():
                    item.request.future.cancel()
            queue.items.clear()
        self.queued_inputs = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run_on_model_thread(self, forward: Callable[[], Vectors]) -> Vectors:
        """Run `forward` on the model thread and wait for it (blocking: call it from another thread),
        so work outside batches, like a load's bf16 probe, does not compete with serving."""
        return self._executor.submit(forward).result()

    async def submit(self, model: EmbeddingModel, sequences: Sequence[Sequence[int]]) -> Vectors:
        """Raw embeddings of `sequences`, in order; cancelling the caller drops its queued inputs."""
        loop = asyncio.get_running_loop()
        request = _Request(future=loop.create_future(), count=len(sequences), remaining=len(sequences))
        queue = self._queues.get(model.name)
        if queue is None or queue.model is not model:
            if queue is not None and queue.items:
                # A reloaded model under the same name: keep the old queue's inputs on the old model.
                queue = self._queues[f"{model.name}#{id(model)}"] = _Queue(model)
            else:
                queue = self._queues[model.name] = _Queue(model)
        now = time.monotonic()
        queue.items.extend(_Item(ids, request, position, now) for position, ids in enumerate(sequences))
        self.queued_inputs += len(sequences)
        self._wakeup.set()
        return await request.future

    def _oldest_queue(self) -> tuple[str, _Queue] | None:
        oldest: tuple[str, _Queue] | None = None
        for key, queue in list(self._queues.items()):
            while queue.items and queue.items[0].request.future.done():
                queue.items.popleft()
                self.queued_inputs -= 1
            if not queue.items:
                if key != queue.model.name:
                    del self._queues[key]
                continue
            if oldest is None or queue.items[0].enqueued_at < oldest[1].items[0].enqueued_at:
                oldest = (key, queue)
        return oldest

    async def _run(self) -> None:
        while True:
            picked = self._oldest_queue()
            if picked is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            _, queue = picked
            await self._gather_more(queue)
            items = self._take(queue)
            if not items:
                continue
            for batch in self._split(items):
                try:
                    await self._execute(queue.model, batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("batcher failed on a batch of %d", len(batch))

    async def _gather_more(self, queue: _Queue) -> None:
        """Wait until the oldest input has waited max_wait_s or a full batch is queued."""
        if self.max_wait_s <= 0:
            return
        deadline = queue.items[0].enqueued_at + self.max_wait_s
        while len(queue.items) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, queue: _Queue) -> list[_Item]:
        items: list[_Item] = []
        while queue.items and len(items) < self.max_batch_size:
            item = queue.items.popleft()
            self.queued_inputs -= 1
            if not item.request.future.done():
                items.append(item)
        return items

    def _split(self, items: list[_Item]) -> list[list[_Item]]:
        """Sort by length and cut into forward passes with the least padded work plus a fixed cost per
        pass, within the batch size and padded-token budget."""
        items.sort(key=lambda item: len(item.ids))
        lengths = [len(item.ids) for item in items]
        count = len(items)
        best = [0.0] + [float("inf")] * count
        cut = [0] * (count + 1)
        for end in range(1, count + 1):
            longest = lengths[end - 1]
            for start in range(end - 1, -1, -1):
                size = end - start
                if size > self.max_batch_size or (size > 1 and size * longest > self.max_batch_tokens):
                    break
                cost = best[start] + self.forward_overhead_tokens + size * longest
                if cost < best[end]:
                    best[end], cut[end] = cost, start
        batches: list[list[_Item]] = []
        end = count
        while end > 0:
            batches.append(items[cut[end] : end])
            end = cut[end]
        batches.reverse()
        return batches

    async def _execute(self, model: EmbeddingModel, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.request.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.running_inputs = len(live)
        try:
            vectors = await loop.run_in_executor(self._executor, model.embed, [item.ids for item in live])
        except Exception as error:
            for item in live:
                if not item.request.future.done():
                    item.request.future.set_exception(error)
            raise
        finally:
            self.running_inputs = 0
        elapsed = time.monotonic() - started
        for row, item in enumerate(live):
            request = item.request
            if request.future.done():
                continue
            if request.out is None:
                request.out = np.empty((request.count, vectors.shape[1]), dtype=np.float32)
            request.out[item.position] = vectors[row]
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.out)
        self.batches += 1
        self.batched_inputs += len(live)
        self.seconds_per_input = 0.9 * self.seconds_per_input + 0.1 * (elapsed / len(live))
        self._on_batch(
            BatchReport(
                model=model.name,
                size=len(live),
                padded_tokens=len(live) * max(len(item.ids) for item in live),
                tokens=sum(len(item.ids) for item in live),
                queue_seconds=[started - item.enqueued_at for item in live],
                inference_seconds=elapsed,
            )
        )
