"""The predictions runner's control flow over a fake store and a fake gateway (an in-process gRPC
server): outputs per task, throttled progress, cancel, lost leases, retries, limits and a clean
stop; plus the change notifications it sends."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from inference.v1 import (
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

from services.common.errors import RpcFailure, invalid_argument, retry_info
from services.predictions.config import PredictionsConfig
from services.predictions.notify import Changes
from services.predictions.records import Event, Lease, NewPrediction, Prediction, Status, Store, Task
from services.predictions.runner import Runner, RunnerSettings
from services.predictions.server import build, runner_settings, webhook_settings
from services.predictions.webhooks import WebhookSettings
from tests.unit.fakes import eventually, within

Context = grpc.aio.ServicerContext[Any, Any]
WORKER = "worker-a"
CREDENTIALS = {"authorization": "Bearer sk-test"}


class FakeStore:
    """The part of the Store the runner uses, in memory, recording every call."""

    def __init__(self) -> None:
        self.rows: dict[str, Prediction] = {}
        self.runnable_at: dict[str, float] = {}
        self.lost: set[str] = set()
        self.progress_calls: list[tuple[str, Any, str, tuple[Event, ...]]] = []
        self.releases: list[tuple[str, float, str]] = []
        self.finishes: list[str] = []
        self.purged: list[datetime] = []
        self.claims = 0
        # Running predictions whose lease lapsed: claim hands them out again (unless excluded).
        self.lapsed: set[str] = set()
        self.honor_exclude = True
        # How long each progress write takes, and the order writes began and ended in.
        self.progress_seconds = 0.0
        self.writes: list[str] = []

    def add(self, task: Task, input: dict[str, Any], attempt: int = 0) -> str:
        prediction_id = f"p{len(self.rows) + 1}"
        self.rows[prediction_id] = Prediction(
            id=prediction_id,
            owner="user",
            model="m",
            version="",
            task=task,
            served_model="served-m",
            input=input,
            effective_input=input,
            status="starting",
            output=None,
            error="",
            logs="",
            created_at=datetime.now(UTC),
            started_at=None,
            completed_at=None,
            metrics={},
            webhook="",
            webhook_events_filter=(),
            credentials=dict(CREDENTIALS),
            attempt=attempt,
            cancel_requested=False,
            worker="",
            lease_expires_at=None,
        )
        self.runnable_at[prediction_id] = 0.0
        return prediction_id

    def _update(self, prediction_id: str, **changes: Any) -> Prediction:
        row = dataclasses.replace(self.rows[prediction_id], **changes)
        self.rows[prediction_id] = row
        return row

    def _holds(self, prediction_id: str, worker: str, attempt: int | None) -> bool:
        row = self.rows[prediction_id]
        return (
            row.worker == worker
            and row.status == "processing"
            and prediction_id not in self.lost
            and (attempt is None or attempt == row.attempt)
        )

    async def claim(
        self,
        worker: str,
        lease_seconds: float,
        limit: int,
        max_attempts: int,
        *,
        exclude: Collection[str] = (),
    ) -> list[Prediction]:
        self.claims += 1
        now = time.monotonic()
        skip = set(exclude) if self.honor_exclude else set()
        due = [
            row
            for row in self.rows.values()
            if row.id not in skip
            and (
                (row.status == "starting" and self.runnable_at[row.id] <= now)
                or (row.status == "processing" and row.id in self.lapsed)
            )
        ][:limit]
        self.lapsed -= {row.id for row in due}
        return [
            self._update(row.id, status="processing", worker=worker, attempt=row.attempt + 1) for row in due
        ]

    async def heartbeat(
        self, prediction_id: str, worker: str, lease_seconds: float, *, attempt: int | None = None
    ) -> Lease:
        row = self.rows[prediction_id]
        if self._holds(prediction_id, worker, attempt):
            self.lapsed.discard(prediction_id)
            return Lease(True, row.cancel_requested)
        return Lease(False, row.cancel_requested)

    async def progress(
        self,
        prediction_id: str,
        worker: str,
        output: Any | None,
        logs: str,
        events: Sequence[Event],
        *,
        attempt: int | None = None,
    ) -> bool:
        if not self._holds(prediction_id, worker, attempt):
            return False
        self.writes.append("progress")
        await asyncio.sleep(self.progress_seconds)
        self.writes.append("progress done")
        self.progress_calls.append((prediction_id, output, logs, tuple(events)))
        self._update(prediction_id, output=output, logs=logs)
        return True

    async def release(
        self,
        prediction_id: str,
        worker: str,
        delay_seconds: float,
        logs: str,
        *,
        attempt: int | None = None,
    ) -> bool:
        if not self._holds(prediction_id, worker, attempt):
            return False
        self.writes.append("release")
        self.releases.append((prediction_id, delay_seconds, logs))
        self.runnable_at[prediction_id] = time.monotonic() + delay_seconds
        self._update(prediction_id, status="starting", worker="", logs=logs)
        return True

    async def finish(
        self,
        prediction_id: str,
        worker: str,
        status: Status,
        output: Any | None,
        error: str,
        logs: str,
        metrics: dict[str, float],
        *,
        attempt: int | None = None,
    ) -> Prediction | None:
        if not self._holds(prediction_id, worker, attempt):
            return None
        self.writes.append("finish")
        self.finishes.append(prediction_id)
        return self._update(
            prediction_id,
            status=status,
            output=output,
            error=error,
            logs=logs,
            metrics=metrics,
            credentials={},
        )

    async def purge(self, older_than: datetime) -> int:
        self.purged.append(older_than)
        return 0

    def ended(self, prediction_id: str) -> bool:
        return self.rows[prediction_id].status in ("succeeded", "failed", "canceled")


class FakeGateway(generation_pb2_grpc.GenerationServiceServicer, embedding_pb2_grpc.EmbeddingServiceServicer):
    """Streams one token per character of `text`, `delay` seconds apart, or fails with `failure`."""

    def __init__(self) -> None:
        self.text = "hello world"
        self.delay = 0.0
        self.failure: RpcFailure | None = None
        self.metadata: list[dict[str, str]] = []
        self.requests: list[Any] = []
        self.cancelled = 0
        self.embed_delay = 0.0
        # Seconds before `failure` is answered.
        self.fail_after = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    async def _stream(
        self, request: Any, context: Context, last: dict[str, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata() or ()})
        self.requests.append(request)
        if self.failure is not None:
            await asyncio.sleep(self.fail_after)
            await self.failure.abort(context)
        try:
            for i, piece in enumerate(self.text):
                await asyncio.sleep(self.delay)
                message = generation_pb2.GenerateStreamResponse(
                    request_id="req-1", token=common_pb2.Token(id=i, text=piece, logprob=-0.5)
                )
                if i == len(self.text) - 1:
                    message.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    message.generated_text = self.text
                    message.tokens_generated = len(self.text)
                    message.generation_time = 0.25
                    message.usage.CopyFrom(
                        common_pb2.Usage(prompt_tokens=3, completion_tokens=len(self.text))
                    )
                    for key, value in last.items():
                        setattr(message, key, value)
                yield message
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def GenerateStream(
        self, request: Any, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for message in self._stream(request, context, {}):
            yield message

    async def ChatStream(
        self, request: Any, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for message in self._stream(request, context, {}):
            yield message

    async def SolveMathStream(
        self, request: Any, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for message in self._stream(request, context, {"answer": "84"}):
            yield message

    async def SolveCodingStream(
        self, request: Any, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for message in self._stream(request, context, {"code": "x", "language": "go"}):
            yield message

    async def Embed(self, request: Any, context: Context) -> embedding_pb2.EmbedResponse:
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata() or ()})
        self.requests.append(request)
        if self.failure is not None:
            await self.failure.abort(context)
        await asyncio.sleep(self.embed_delay)
        return embedding_pb2.EmbedResponse(
            data=[embedding_pb2.Embedding(index=0, embedding=[0.5, 0.25])],
            model=request.model,
            dimensions=2,
            usage=embedding_pb2.EmbeddingUsage(prompt_tokens=4, total_tokens=4),
        )


@pytest.fixture(scope="module")
async def gateway_server() -> AsyncIterator[tuple[FakeGateway, str]]:
    # Implements only the streams the runner calls (and Embed); the rest stay abstract.
    gateway = FakeGateway()  # type: ignore[abstract]
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(gateway, server)
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield gateway, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
def gateway(gateway_server: tuple[FakeGateway, str]) -> FakeGateway:
    gateway_server[0].reset()
    return gateway_server[0]


RunnerFactory = Callable[..., Awaitable[Runner]]


@pytest.fixture
async def make_runner(
    gateway_server: tuple[FakeGateway, str],
) -> AsyncIterator[RunnerFactory]:
    runners: list[Runner] = []

    async def build(store: FakeStore, changes: Changes | None = None, **settings: Any) -> Runner:
        fast = {"poll_seconds": 0.02, "progress_seconds": 0.0, "lease_seconds": 3.0, **settings}
        runner = Runner(
            cast(Store, store), gateway_server[1], RunnerSettings(**fast), changes or Changes(), WORKER
        )
        await runner.start()
        runners.append(runner)
        return runner

    yield build
    for runner in runners:
        await within(runner.stop(0))


async def test_generate_succeeds_with_the_unary_shape_and_forwards_credentials(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi", "parameters": {"max_new_tokens": 11}})
    changes = Changes()
    await make_runner(store, changes)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert row.status == "succeeded", row.error
    output: dict[str, Any] = cast(dict[str, Any], row.output)
    assert output["generated_text"] == "hello world"
    assert output["finish_reason"] == "FINISH_REASON_LENGTH"
    assert output["usage"] == {"prompt_tokens": 3, "completion_tokens": 11, "total_tokens": 0}
    assert output["model"] == "served-m" and output["request_id"] == "req-1"
    assert output["sequences"][0]["text"] == "hello world"
    assert row.metrics["input_token_count"] == 3 and row.metrics["output_token_count"] == 11
    assert 0 <= row.metrics["time_to_first_token"] <= row.metrics["predict_time"] <= row.metrics["total_time"]
    assert "run 1 on worker worker-a" in row.logs and "11 tokens in" in row.logs
    assert gateway.metadata[0]["authorization"] == "Bearer sk-test"
    assert gateway.metadata[0]["x-request-id"] == prediction_id
    assert gateway.requests[0].model == "served-m" and gateway.requests[0].parameters.max_new_tokens == 11
    # Partial outputs grow token by token; the first one carries the first log lines.
    texts = [output["text"] for _, output, _, _ in store.progress_calls]
    assert texts == sorted(texts, key=len) and texts[-1].startswith("hello")
    assert store.progress_calls[0][3] == ("output", "logs")
    assert all(events == ("output",) for *_, events in store.progress_calls[1:])


async def test_progress_is_throttled(gateway: FakeGateway, make_runner: RunnerFactory) -> None:
    gateway.text = "x" * 40
    gateway.delay = 0.01
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    started = time.monotonic()
    await make_runner(store, progress_seconds=0.1)
    await eventually(lambda: store.ended(prediction_id))
    elapsed = time.monotonic() - started
    # At least 0.4 s of tokens: a write at most every 0.1 s, never one per token.
    assert 1 <= len(store.progress_calls) <= elapsed / 0.1 + 1, (len(store.progress_calls), elapsed)
    assert len(store.progress_calls) < 20


@pytest.mark.parametrize(
    ("task", "input", "expected"),
    [
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi"}]},
            {"message": {"role": "assistant", "content": "hello world"}},
        ),
        ("math", {"problem": "12 * 7"}, {"solution": "hello world", "answer": "84"}),
        (
            "coding",
            {"problem": "p", "language": "go"},
            {"solution": "hello world", "code": "x", "language": "go"},
        ),
        (
            "embed",
            {"input": "a"},
            {"dimensions": 2, "model": "served-m", "usage": {"prompt_tokens": 4, "total_tokens": 4}},
        ),
    ],
)
async def test_each_task_ends_with_its_unary_shape(
    gateway: FakeGateway,
    make_runner: RunnerFactory,
    task: Task,
    input: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    store = FakeStore()
    prediction_id = store.add(task, input)
    await make_runner(store)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert row.status == "succeeded", row.error
    output: dict[str, Any] = cast(dict[str, Any], row.output)
    assert {key: output[key] for key in expected} == expected
    if task == "embed":
        assert output["data"][0]["embedding"] == [0.5, 0.25]
        assert row.metrics["input_token_count"] == 4


async def test_cancel_local_cancels_the_gateway_call(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.text = "x" * 500
    gateway.delay = 0.01
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store)
    assert not runner.cancel_local("nope")
    await eventually(lambda: bool(store.progress_calls))
    assert runner.cancel_local(prediction_id)
    await eventually(lambda: store.ended(prediction_id))
    assert store.rows[prediction_id].status == "canceled"
    await eventually(lambda: gateway.cancelled == 1)
    assert runner.running == 0


@pytest.mark.parametrize("how", ["cancel", "stop"])
async def test_a_cancel_or_stop_lets_a_progress_write_end_before_the_last_write(
    gateway: FakeGateway, make_runner: RunnerFactory, how: str
) -> None:
    gateway.text = "x" * 500
    gateway.delay = 0.01
    store = FakeStore()
    store.progress_seconds = 0.2
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store)
    await eventually(lambda: store.writes == ["progress"])
    if how == "cancel":
        assert runner.cancel_local(prediction_id)
        await eventually(lambda: store.ended(prediction_id))
    else:
        await within(runner.stop(0))
    assert store.writes == ["progress", "progress done", "finish" if how == "cancel" else "release"]
    assert [output for _, output, _, _ in store.progress_calls] == [{"text": "x"}]


async def test_a_cancel_seen_by_the_heartbeat_ends_the_run(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.text = "x" * 500
    gateway.delay = 0.01
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store, lease_seconds=0.15)
    await eventually(lambda: bool(store.progress_calls))
    store._update(prediction_id, cancel_requested=True)
    await eventually(lambda: store.ended(prediction_id), 2.0)
    assert store.rows[prediction_id].status == "canceled"
    await eventually(lambda: gateway.cancelled == 1)


async def test_a_lost_lease_drops_the_run_silently(gateway: FakeGateway, make_runner: RunnerFactory) -> None:
    gateway.text = "x" * 500
    gateway.delay = 0.01
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store, lease_seconds=0.15)
    await eventually(lambda: bool(store.progress_calls))
    store.lost.add(prediction_id)
    await eventually(lambda: runner.running == 0, 2.0)
    await eventually(lambda: gateway.cancelled == 1)
    assert store.finishes == [] and store.releases == []
    assert store.rows[prediction_id].status == "processing"


async def test_a_run_whose_own_lease_lapsed_is_not_claimed_again_by_its_worker(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.text = "x" * 60
    gateway.delay = 0.01
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store)
    await eventually(lambda: bool(store.progress_calls))
    store.lapsed.add(prediction_id)
    claims = store.claims
    runner.wake()
    await eventually(lambda: store.claims >= claims + 2)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert row.status == "succeeded" and row.attempt == 1
    assert len(gateway.requests) == 1


async def test_a_claim_of_a_prediction_running_here_does_not_start_a_second_run(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.text = "x" * 60
    gateway.delay = 0.01
    store = FakeStore()
    store.honor_exclude = False
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store)
    await eventually(lambda: bool(store.progress_calls))
    store.lapsed.add(prediction_id)
    runner.wake()
    await eventually(lambda: store.rows[prediction_id].attempt == 2)
    # The first run's writes now fail (the store holds attempt 2): it stops; none starts twice.
    await eventually(lambda: runner.running == 0, 2.0)
    assert len(gateway.requests) == 1
    assert store.finishes == [] and store.rows[prediction_id].status == "processing"


async def test_a_busy_gateway_releases_with_its_retry_delay_then_fails_after_max_attempts(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.failure = RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", (retry_info(0.05),))
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store, max_attempts=3)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert [delay for _, delay, _ in store.releases] == pytest.approx([0.05, 0.05])
    assert row.status == "failed" and row.attempt == 3
    assert row.error == "RESOURCE_EXHAUSTED: queue full (after 3 attempts)"
    assert "retrying in 0.05 s" in row.logs


async def test_a_call_the_gateway_cancelled_is_retried_then_fails_after_max_attempts(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.failure = RpcFailure(grpc.StatusCode.CANCELLED, "gateway restarting", (retry_info(0.05),))
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store, max_attempts=3)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert [delay for _, delay, _ in store.releases] == pytest.approx([0.05, 0.05])
    assert row.status == "failed" and row.error == "CANCELLED: gateway restarting (after 3 attempts)"


async def test_a_gateway_cancel_after_a_cancel_was_asked_ends_canceled(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.failure = RpcFailure(grpc.StatusCode.CANCELLED, "cancelled")
    gateway.fail_after = 0.2
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store)
    await eventually(lambda: bool(gateway.requests))
    # Asked on another replica; this runner's heartbeat has not seen it yet.
    store._update(prediction_id, cancel_requested=True)
    await eventually(lambda: store.ended(prediction_id))
    assert store.rows[prediction_id].status == "canceled" and store.releases == []


async def test_an_unavailable_gateway_backs_off_without_retry_info(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.failure = RpcFailure(grpc.StatusCode.UNAVAILABLE, "no generator")
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store, retry_base_seconds=10.0)
    await eventually(lambda: bool(store.releases))
    assert 5.0 <= store.releases[0][1] <= 10.0
    assert store.rows[prediction_id].status == "starting"


async def test_a_refused_request_fails_with_the_code_and_the_field(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.failure = invalid_argument([("parameters.temperature", "must be at least 0")])
    store = FakeStore()
    prediction_id = store.add("chat", {"messages": [{"role": "user", "content": "hi"}]})
    await make_runner(store)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert row.status == "failed" and store.releases == []
    assert row.error == "INVALID_ARGUMENT: parameters.temperature: must be at least 0"


@pytest.mark.parametrize("task", ["generate", "embed"])
async def test_a_gateway_call_past_the_predict_timeout_fails_naming_the_flag(
    gateway: FakeGateway, make_runner: RunnerFactory, task: Task
) -> None:
    gateway.text = "x" * 500
    gateway.delay = 0.01
    gateway.embed_delay = 5.0
    store = FakeStore()
    prediction_id = store.add(task, {"prompt": "hi"} if task == "generate" else {"input": "a"})
    started = time.monotonic()
    await make_runner(store, predict_timeout_seconds=0.3)
    await eventually(lambda: store.ended(prediction_id), 3.0)
    row = store.rows[prediction_id]
    assert row.status == "failed" and store.releases == []
    assert row.error.startswith("DEADLINE_EXCEEDED")
    assert "longer than 0.3 s: PREDICTIONS_PREDICT_TIMEOUT_SECONDS" in row.error
    assert time.monotonic() - started < 3.0


async def test_a_deadline_the_gateway_hit_on_its_own_is_not_blamed_on_the_flag(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.failure = RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "generator too slow")
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store)
    await eventually(lambda: store.ended(prediction_id))
    assert store.rows[prediction_id].error == "DEADLINE_EXCEEDED: generator too slow"


async def test_an_input_the_request_cannot_carry_fails_without_a_call(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi", "parameters": {"top_k": "many"}})
    await make_runner(store)
    await eventually(lambda: store.ended(prediction_id))
    assert store.rows[prediction_id].error.startswith("INVALID_ARGUMENT: input.parameters.top_k")
    assert gateway.requests == []


async def test_an_output_over_the_limit_fails_naming_size_and_limit(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    await make_runner(store, max_output_bytes=100)
    await eventually(lambda: store.ended(prediction_id))
    row = store.rows[prediction_id]
    assert row.status == "failed"
    assert "over the limit of 100 bytes (PREDICTIONS_MAX_OUTPUT_BYTES)" in row.error


async def test_stop_gives_running_predictions_back(gateway: FakeGateway, make_runner: RunnerFactory) -> None:
    gateway.text = "x" * 500
    gateway.delay = 0.01
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store)
    await eventually(lambda: bool(store.progress_calls))
    await within(runner.stop(grace=0.05))
    assert [(pid, delay) for pid, delay, _ in store.releases] == [(prediction_id, 0.0)]
    assert store.rows[prediction_id].status == "starting"
    assert "given back" in store.rows[prediction_id].logs
    await eventually(lambda: gateway.cancelled == 1)
    # Another runner takes it over from where the store left it.
    gateway.text, gateway.delay = "done", 0.0
    await make_runner(store)
    await eventually(lambda: store.ended(prediction_id))
    assert store.rows[prediction_id].status == "succeeded" and store.rows[prediction_id].attempt == 2


async def test_stop_waits_for_runs_that_end_within_the_grace(
    gateway: FakeGateway, make_runner: RunnerFactory
) -> None:
    gateway.text = "x" * 10
    gateway.delay = 0.02
    store = FakeStore()
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner = await make_runner(store)
    await eventually(lambda: bool(store.progress_calls))
    await within(runner.stop(grace=5))
    assert store.rows[prediction_id].status == "succeeded" and store.releases == []


async def test_claims_no_more_than_the_concurrency(gateway: FakeGateway, make_runner: RunnerFactory) -> None:
    gateway.text = "x" * 20
    gateway.delay = 0.01
    store = FakeStore()
    ids = [store.add("generate", {"prompt": "hi"}) for _ in range(5)]
    runner = await make_runner(store, concurrency=2)
    most = 0

    def all_ended() -> bool:
        nonlocal most
        most = max(most, runner.running)
        return all(store.ended(i) for i in ids)

    await eventually(all_ended)
    assert most == 2
    assert all(store.rows[i].status == "succeeded" for i in ids)


async def test_wake_claims_at_once_and_purge_runs(gateway: FakeGateway, make_runner: RunnerFactory) -> None:
    store = FakeStore()
    runner = await make_runner(store, poll_seconds=30.0, retention_seconds=60.0)
    await eventually(lambda: store.claims >= 1 and bool(store.purged))
    assert abs((datetime.now(UTC) - store.purged[0]).total_seconds() - 60.0) < 5
    prediction_id = store.add("generate", {"prompt": "hi"})
    runner.wake()
    await eventually(lambda: store.ended(prediction_id), 2.0)


async def test_changes_wake_waiters_and_forget_them() -> None:
    changes = Changes()
    waiter = asyncio.create_task(changes.wait("p1", 5.0))
    await eventually(lambda: changes.waiting("p1") == 1)
    changes.changed("p2")
    assert not waiter.done()
    changes.changed("p1")
    assert await within(waiter) is True
    assert await changes.wait("p1", 0.01) is False
    assert changes.waiting() == 0
    cancelled = asyncio.create_task(changes.wait("p3", 5.0))
    await eventually(lambda: changes.waiting("p3") == 1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert changes.waiting() == 0


async def test_the_runner_notifies_every_write(gateway: FakeGateway, make_runner: RunnerFactory) -> None:
    store = FakeStore()
    changes = Changes()
    prediction_id = store.add("generate", {"prompt": "hi"})
    seen: list[bool] = []

    async def watch() -> None:
        while not store.ended(prediction_id):
            seen.append(await changes.wait(prediction_id, 5.0))

    watcher = asyncio.create_task(watch())
    await make_runner(store, changes)
    await within(watcher)
    assert seen and all(seen)


def test_the_pool_size_is_derived_from_the_concurrency_unless_set() -> None:
    assert PredictionsConfig(concurrency=16).pool_size == 16 + 8 + 4
    assert PredictionsConfig(concurrency=3).pool_size == 3 + 2 + 4
    assert PredictionsConfig(database_pool_size=5).pool_size == 5
    with pytest.raises(ValueError, match="--database-pool-size must not be negative"):
        PredictionsConfig(database_pool_size=-1).validate()


def test_the_settings_defaults_are_the_configs_and_the_server_builds_them_from_it() -> None:
    assert runner_settings(PredictionsConfig()) == RunnerSettings()
    assert webhook_settings(PredictionsConfig()) == WebhookSettings()
    chosen = PredictionsConfig(progress_seconds=2.0, predict_timeout_seconds=9.0, concurrency=3)
    settings = runner_settings(chosen)
    assert (settings.progress_seconds, settings.predict_timeout_seconds) == (2.0, 9.0)
    assert settings.concurrency == 3 and webhook_settings(chosen).concurrency == 3
    with pytest.raises(ValueError, match="--progress-seconds must not be negative"):
        PredictionsConfig(progress_seconds=-1).validate()


async def test_the_server_sends_a_queued_webhook_without_waiting_for_the_poll(tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = []

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    receiver = await asyncio.start_server(receive, "127.0.0.1", 0)
    port = receiver.sockets[0].getsockname()[1]
    config = PredictionsConfig(
        host="127.0.0.1",
        port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'predictions.db'}",
        gateway_address="127.0.0.1:1",
        allow_private_webhooks=True,
        # Neither the sender nor the runner looks on its own during the test.
        poll_seconds=60.0,
    )
    service = await build(config)
    try:
        await asyncio.sleep(0.2)
        waiting = await service.store.create(
            NewPrediction(
                id="p-wake",
                owner="anonymous",
                model="m",
                version="1",
                task="generate",
                served_model="m",
                input={"prompt": "hi"},
                effective_input={"prompt": "hi"},
                webhook=f"http://127.0.0.1:{port}/hook",
                webhook_events_filter=(),
                credentials={},
                created_at=datetime.now(UTC),
            ),
            0,
            0,
        )
        # A cancel the servicer asks for queues `completed`; it goes out at once.
        await service.store.cancel(waiting.id, None)
        await eventually(lambda: bool(bodies), 5.0)
        assert bodies[0]["id"] == "p-wake" and bodies[0]["status"] == "canceled"
    finally:
        await within(service.stop(0))
        receiver.close()
        await receiver.wait_closed()
