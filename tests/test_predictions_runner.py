"""The predictions runner over the real stack: the SQL store on a temporary SQLite file and the
session's gateway, generator and embedder processes. Outputs and usage of every task, cancel of a
running generation (the generator frees its slot), a refused parameter, and a stop that hands a
running prediction to another runner."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from inference.v1 import info_pb2, info_pb2_grpc

from services.predictions.notify import Changes
from services.predictions.records import NewPrediction, Prediction, Store, Task
from services.predictions.runner import Runner, RunnerSettings
from services.predictions.store import open_store
from tests.fixtures_gateway import GatewayService

# Seconds a prediction of the tiny test models may take end to end.
TIMEOUT = 120.0
STORY = [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(
        f"sqlite+aiosqlite:///{tmp_path / 'predictions.db'}", lambda p: f'{{"id": "{p.id}"}}'
    )
    yield opened
    await opened.close()


@pytest.fixture(scope="module")
def served_models(gateway_service: GatewayService) -> dict[str, str]:
    """task ("generation", "embedding") -> the id the gateway serves it under."""
    with grpc.insecure_channel(gateway_service.address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
            info_pb2.ListServedModelsRequest(), metadata=gateway_service.metadata(), timeout=30
        )
    return {model.task: model.id for model in reply.models}


RunnerFactory = Callable[..., Awaitable[Runner]]


@pytest.fixture
async def make_runner(store: Store, gateway_service: GatewayService) -> AsyncIterator[RunnerFactory]:
    runners: list[Runner] = []

    async def build(worker: str, changes: Changes, **settings: Any) -> Runner:
        chosen = {"poll_seconds": 0.1, "lease_seconds": 3.0, **settings}
        runner = Runner(store, gateway_service.address, RunnerSettings(**chosen), changes, worker)
        await runner.start()
        runners.append(runner)
        return runner

    yield build
    for runner in runners:
        await runner.stop(0)


async def create(
    store: Store, gateway: GatewayService, task: Task, served_model: str, input: dict[str, Any]
) -> str:
    prediction_id = uuid.uuid4().hex
    await store.create(
        NewPrediction(
            id=prediction_id,
            owner="user",
            model=served_model,
            version="",
            task=task,
            served_model=served_model,
            input=input,
            effective_input=input,
            webhook="",
            webhook_events_filter=(),
            credentials=dict(gateway.metadata("user")),
            created_at=datetime.now(UTC),
        ),
        0,
        0,
    )
    return prediction_id


async def until(
    store: Store,
    changes: Changes,
    prediction_id: str,
    done: Callable[[Prediction], bool],
    limit_s: float = TIMEOUT,
) -> Prediction:
    """The prediction once `done` holds for it; fails after `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    while True:
        prediction = await store.get(prediction_id)
        assert prediction is not None
        if done(prediction):
            return prediction
        assert time.monotonic() < deadline, f"{prediction_id} stayed {prediction.status}: {prediction.logs}"
        await changes.wait(prediction_id, 0.5)


def output_of(prediction: Prediction) -> dict[str, Any]:
    assert isinstance(prediction.output, dict), prediction.output
    return prediction.output


def ended(prediction: Prediction) -> bool:
    return prediction.status in ("succeeded", "failed", "canceled")


def has_output(prediction: Prediction) -> bool:
    return prediction.status == "processing" and bool(prediction.output)


async def generator_running(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stats = await info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=10)
    return stats.components[0].requests_running


async def test_each_task_succeeds_with_its_shape_and_usage(
    store: Store, gateway_service: GatewayService, served_models: dict[str, str], make_runner: RunnerFactory
) -> None:
    changes = Changes()
    await make_runner("worker-1", changes)
    generation, embedding = served_models["generation"], served_models["embedding"]
    parameters = {"max_new_tokens": 8, "temperature": 0}
    ids = {
        "generate": await create(
            store, gateway_service, "generate", generation, {"prompt": "The sky is", "parameters": parameters}
        ),
        "chat": await create(
            store,
            gateway_service,
            "chat",
            generation,
            {"messages": [{"role": "user", "content": "Say hi."}], "parameters": parameters},
        ),
        "math": await create(
            store,
            gateway_service,
            "math",
            generation,
            {"problem": "What is 2 + 3?", "parameters": parameters},
        ),
        "coding": await create(
            store,
            gateway_service,
            "coding",
            generation,
            {"problem": "Add two numbers.", "language": "go", "parameters": parameters},
        ),
        "embed": await create(store, gateway_service, "embed", embedding, {"input": ["one", "two"]}),
    }
    done = {task: await until(store, changes, prediction_id, ended) for task, prediction_id in ids.items()}
    for task, prediction in done.items():
        assert prediction.status == "succeeded", (task, prediction.error)
        assert prediction.credentials == {}
        assert prediction.metrics["predict_time"] > 0
        assert prediction.metrics["total_time"] >= prediction.metrics["predict_time"]
        assert "run 1 on worker worker-1" in prediction.logs

    generate = output_of(done["generate"])
    assert isinstance(generate["generated_text"], str) and generate["generated_text"]
    assert generate["finish_reason"].startswith("FINISH_REASON_")
    assert generate["usage"]["completion_tokens"] == generate["tokens_generated"] <= 8
    assert generate["usage"]["prompt_tokens"] > 0 and generate["model"] == generation
    assert done["generate"].metrics["output_token_count"] == generate["usage"]["completion_tokens"]
    assert done["generate"].metrics["input_token_count"] == generate["usage"]["prompt_tokens"]
    assert 0 < done["generate"].metrics["time_to_first_token"] <= done["generate"].metrics["predict_time"]

    chat = output_of(done["chat"])
    assert chat["message"]["role"] == "assistant" and chat["message"]["content"]
    assert 0 < chat["usage"]["completion_tokens"] <= 8

    math = output_of(done["math"])
    assert math["solution"] and isinstance(math["answer"], str) and math["usage"]["completion_tokens"] <= 8
    coding = output_of(done["coding"])
    assert coding["solution"] and coding["code"] and coding["language"] == "go"

    embed = output_of(done["embed"])
    assert [item["index"] for item in embed["data"]] == [0, 1]
    assert len(embed["data"][0]["embedding"]) == embed["dimensions"] > 0
    assert embed["usage"]["prompt_tokens"] > 0
    assert done["embed"].metrics["input_token_count"] == embed["usage"]["prompt_tokens"]


async def test_cancel_of_a_running_generation_frees_the_generator(
    store: Store,
    gateway_service: GatewayService,
    generator_address: str,
    served_models: dict[str, str],
    make_runner: RunnerFactory,
) -> None:
    changes = Changes()
    # A short lease: the heartbeat (a third of it) notices the cancel asked through the store.
    await make_runner("worker-1", changes, lease_seconds=1.5)
    input = {"messages": STORY, "parameters": {"max_new_tokens": 2000, "temperature": 0.8, "seed": 1}}
    prediction_id = await create(store, gateway_service, "chat", served_models["generation"], input)
    running = await until(store, changes, prediction_id, has_output)
    assert output_of(running)["text"]
    asked = time.monotonic()
    await store.cancel(prediction_id, "user")
    canceled = await until(store, changes, prediction_id, ended, limit_s=10)
    assert canceled.status == "canceled"
    assert time.monotonic() - asked < 5
    for _ in range(50):
        if await generator_running(generator_address) == 0:
            break
        await asyncio.sleep(0.1)
    assert await generator_running(generator_address) == 0


async def test_a_parameter_the_gateway_refuses_fails_naming_the_field(
    store: Store, gateway_service: GatewayService, served_models: dict[str, str], make_runner: RunnerFactory
) -> None:
    changes = Changes()
    await make_runner("worker-1", changes)
    input = {"prompt": "Hi", "parameters": {"temperature": -1}}
    prediction_id = await create(store, gateway_service, "generate", served_models["generation"], input)
    failed = await until(store, changes, prediction_id, ended)
    assert failed.status == "failed"
    assert failed.error.startswith("INVALID_ARGUMENT: ") and "parameters.temperature" in failed.error
    assert failed.credentials == {}


async def test_a_stopped_runner_gives_its_prediction_to_another(
    store: Store, gateway_service: GatewayService, served_models: dict[str, str], make_runner: RunnerFactory
) -> None:
    changes = Changes()
    first = await make_runner("worker-1", changes)
    input = {"messages": STORY, "parameters": {"max_new_tokens": 48, "temperature": 0}}
    prediction_id = await create(store, gateway_service, "chat", served_models["generation"], input)
    await until(store, changes, prediction_id, has_output)
    await first.stop(grace=0)
    released = await store.get(prediction_id)
    assert released is not None and released.status == "starting", released
    assert "given back" in released.logs
    await make_runner("worker-2", changes)
    finished = await until(store, changes, prediction_id, ended)
    assert finished.status == "succeeded", finished.error
    assert finished.attempt == 2 and finished.worker in ("worker-2", "")
    assert "run 1 on worker worker-1" in finished.logs and "run 2 on worker worker-2" in finished.logs
    assert output_of(finished)["message"]["content"]
