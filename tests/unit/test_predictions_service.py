"""The predictions service without a process: the prediction JSON (convert) and the servicer's
checks, owners, waits and streams over an in-memory store and a fake runner."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from inference.v1 import common_pb2, predictions_pb2

from services.common.auth import ApiKey, current_key
from services.common.errors import RpcFailure
from services.common.interceptors import Context
from services.predictions import convert, servicer
from services.predictions.config import PredictionsConfig
from services.predictions.errors import MAPPING
from services.predictions.models import ServedModel
from services.predictions.prefer import prefer_wait
from services.predictions.records import (
    Deployment,
    DeploymentExists,
    NewPrediction,
    Page,
    Prediction,
    QueueFull,
)
from services.predictions.servicer import METHOD_SCOPES, PredictionServicer
from services.predictions.stream import TextDiverged, TextFollower
from tests.unit.fakes import within

PUBLIC = "http://api.example:8080"
MODEL = "tiny-gpt"
EMBEDDER = "tiny-embed"
SECRET = "whsec_c2VjcmV0c2VjcmV0c2VjcmV0"
T0 = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)

USER = ApiKey("user", "u" * 64, frozenset({"generate", "embed"}))
OTHER = ApiKey("other", "o" * 64, frozenset({"generate", "embed"}))
EMBED_ONLY = ApiKey("embed-only", "e" * 64, frozenset({"embed"}))
ADMIN = ApiKey("admin", "a" * 64, frozenset({"generate", "embed", "admin"}))


def prediction(**changes: Any) -> Prediction:
    base = Prediction(
        id="p1",
        owner="user",
        model=MODEL,
        version="",
        task="generate",
        served_model=MODEL,
        input={"prompt": "hi"},
        effective_input={"prompt": "hi"},
        status="starting",
        output=None,
        error="",
        logs="",
        created_at=T0,
        started_at=None,
        completed_at=None,
        metrics={},
        webhook="",
        webhook_events_filter=(),
        credentials={"authorization": "Bearer secret"},
        attempt=0,
        cancel_requested=False,
        worker="",
        lease_expires_at=None,
    )
    return dataclasses.replace(base, **changes)


class MemoryStore:
    """The Store calls the servicer makes, in memory; cursors are "at:<index>"."""

    def __init__(self) -> None:
        self.predictions: dict[str, Prediction] = {}
        self.deployments: dict[str, Deployment] = {}
        self.waiting_limit: tuple[int, int] | None = None

    async def create(
        self, new: NewPrediction, max_waiting_per_owner: int, max_waiting_total: int
    ) -> Prediction:
        self.waiting_limit = (max_waiting_per_owner, max_waiting_total)
        waiting = [p for p in self.predictions.values() if p.status == "starting"]
        if max_waiting_total and len(waiting) >= max_waiting_total:
            raise QueueFull("total", max_waiting_total)
        stored = prediction(
            **{f.name: getattr(new, f.name) for f in dataclasses.fields(NewPrediction)}, status="starting"
        )
        self.predictions[new.id] = stored
        return stored

    async def get(self, prediction_id: str, owner: str | None = None) -> Prediction | None:
        found = self.predictions.get(prediction_id)
        if found is None or (owner is not None and found.owner != owner):
            return None
        return found

    async def list_predictions(
        self, owner: str | None, status: str | None, cursor: str | None, limit: int
    ) -> Page:
        rows = sorted(
            (p for p in self.predictions.values() if owner is None or p.owner == owner),
            key=lambda p: (p.created_at, p.id),
            reverse=True,
        )
        rows = [p for p in rows if status is None or p.status == status]
        start = 0
        if cursor is not None:
            if not cursor.startswith("at:"):
                raise ValueError(cursor)
            start = int(cursor[3:])
        end = start + limit
        return Page(
            rows[start:end],
            f"at:{end}" if end < len(rows) else None,
            f"at:{max(0, start - limit)}" if start else None,
        )

    async def cancel(self, prediction_id: str, owner: str | None) -> Prediction | None:
        found = await self.get(prediction_id, owner)
        if found is None:
            return None
        if found.status == "starting":
            found = dataclasses.replace(found, status="canceled", completed_at=datetime.now(UTC))
        elif found.status == "processing":
            found = dataclasses.replace(found, cancel_requested=True)
        self.predictions[prediction_id] = found
        return found

    async def create_deployment(self, deployment: Deployment) -> Deployment:
        if deployment.name in self.deployments:
            raise DeploymentExists(deployment.name)
        self.deployments[deployment.name] = deployment
        return deployment

    async def get_deployment(self, name: str) -> Deployment | None:
        return self.deployments.get(name)

    async def list_deployments(self) -> list[Deployment]:
        return list(self.deployments.values())

    async def update_deployment(self, name: str, changes: dict[str, Any]) -> Deployment | None:
        if name not in self.deployments:
            return None
        self.deployments[name] = dataclasses.replace(self.deployments[name], **changes)
        return self.deployments[name]

    async def delete_deployment(self, name: str) -> bool:
        return self.deployments.pop(name, None) is not None


class Runner:
    def __init__(self) -> None:
        self.wakes = 0
        self.cancelled: list[str] = []

    def wake(self) -> None:
        self.wakes += 1

    def cancel_local(self, prediction_id: str) -> bool:
        self.cancelled.append(prediction_id)
        return True


class Changes:
    """Waits are instant: each wait lets `script` move the store on by one step."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.steps: list[Prediction] = []

    async def wait(self, prediction_id: str, timeout: float) -> bool:  # noqa: ASYNC109
        if self.steps:
            step = self.steps.pop(0)
            self.store.predictions[step.id] = step
            return True
        await asyncio.sleep(min(timeout, 0.01))
        return False


class Models:
    def __init__(self) -> None:
        self.asked_with: list[Sequence[tuple[str, str]]] = []

    async def served(self, metadata: Sequence[tuple[str, str]]) -> dict[str, ServedModel]:
        self.asked_with.append(metadata)
        return {MODEL: ServedModel(MODEL, False), EMBEDDER: ServedModel(EMBEDDER, True)}


async def webhook_check(url: str, allow_private: bool) -> str | None:
    return None if url.startswith("https://") else "must be an https URL here"


class FakeContext:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


def context(*metadata: tuple[str, str]) -> Context:
    return cast(Context, FakeContext(("authorization", "Bearer sk-user"), *metadata))


@dataclasses.dataclass
class Service:
    servicer: PredictionServicer
    store: MemoryStore
    runner: Runner
    changes: Changes
    models: Models


@pytest.fixture
def service() -> Iterator[Service]:
    store, runner, models = MemoryStore(), Runner(), Models()
    changes = Changes(store)
    servicer = PredictionServicer(
        cast(Any, store),
        runner,
        changes,
        models,
        webhook_check,
        public_url=PUBLIC + "/",
        webhook_secret=SECRET,
        max_input_bytes=200,
        max_wait_seconds=5,
        poll_seconds=0.01,
    )
    token = current_key.set(USER)
    yield Service(servicer, store, runner, changes, models)
    current_key.reset(token)


def create_request(model: str = MODEL, **fields: Any) -> predictions_pb2.CreatePredictionRequest:
    input = fields.pop("input", {"prompt": "hi", "parameters": {"max_new_tokens": 8}})
    request = predictions_pb2.CreatePredictionRequest(model=model, **fields)
    request.input.update(input)
    return request


def fields_of(failure: RpcFailure) -> set[str]:
    return {
        violation.field
        for detail in failure.details
        if isinstance(detail, error_details_pb2.BadRequest)
        for violation in detail.field_violations
    }


async def failure(awaitable: Any) -> RpcFailure:
    with pytest.raises(RpcFailure) as raised:
        await within(awaitable)
    return raised.value


# --- convert ---------------------------------------------------------------------------------


def test_prediction_json_prints_every_field_as_envoy_does() -> None:
    body = json.loads(convert.prediction_json(prediction(input={"n": 16.0, "t": 0.5}), PUBLIC))
    assert body["output"] is None
    assert body["error"] == "" and body["logs"] == "" and body["webhook"] == ""
    assert body["webhook_events_filter"] == []
    assert body["input"] == {"n": 16, "t": 0.5}
    assert body["created_at"] == "2026-12-04T12:00:00Z"
    assert "started_at" not in body and "completed_at" not in body
    assert "credentials" not in body
    assert body["urls"] == {
        "get": f"{PUBLIC}/v1/predictions/p1",
        "cancel": f"{PUBLIC}/v1/predictions/p1/cancel",
        "stream": f"{PUBLIC}/v1/predictions/p1/stream",
    }
    assert body["metrics"]["predict_time"] == 0 and body["metrics"]["output_token_count"] == 0
    # Field order is the proto's, as Envoy prints it.
    assert list(body)[:4] == ["id", "model", "version", "status"]


def test_prediction_json_of_an_ended_prediction() -> None:
    ended = prediction(
        status="succeeded",
        output={"generated_text": "hello", "usage": {"completion_tokens": 2}},
        started_at=T0 + timedelta(seconds=1),
        completed_at=T0 + timedelta(seconds=3),
        metrics={"predict_time": 2.0, "output_token_count": 2.0},
    )
    body = json.loads(convert.prediction_json(ended, PUBLIC))
    assert body["output"] == {"generated_text": "hello", "usage": {"completion_tokens": 2}}
    assert body["started_at"] == "2026-12-04T12:00:01Z" and body["completed_at"] == "2026-12-04T12:00:03Z"
    assert body["metrics"]["predict_time"] == 2 and body["metrics"]["total_time"] == 3
    assert body["metrics"]["output_token_count"] == 2


def test_naive_timestamps_from_sqlite_are_utc() -> None:
    naive = prediction(created_at=T0.replace(tzinfo=None))
    assert json.loads(convert.prediction_json(naive, PUBLIC))["created_at"] == "2026-12-04T12:00:00Z"


def test_config_defaults_and_validation() -> None:
    config = PredictionsConfig()
    config.validate()
    assert (config.port, config.metrics_port) == (50054, 9104)
    assert config.database_url == "sqlite+aiosqlite:///.run/predictions.db"
    assert ":" in config.worker
    with pytest.raises(ValueError, match="--public-url"):
        PredictionsConfig(public_url="localhost:8080").validate()
    with pytest.raises(ValueError, match="--max-wait-seconds"):
        PredictionsConfig(max_wait_seconds=0).validate()


def test_the_predictions_tier_does_not_import_the_gateway() -> None:
    # The tiers it imports from: its own package and services/common (whose imports are checked too).
    root = Path(servicer.__file__).parents[1]
    for path in [*(root / "predictions").glob("*.py"), *(root / "common").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.startswith("services.gateway") for name in names), path


def test_the_servicer_keeps_to_protobuf_in_and_out() -> None:
    # Model lookup, Prefer parsing and stream messages live in their own modules.
    source = Path(servicer.__file__).read_text()
    for name in ("class GatewayModels", "def prefer_wait", "def final_message", "ListServedModels"):
        assert name not in source, name


def test_method_scopes_cover_every_rpc() -> None:
    service = predictions_pb2.DESCRIPTOR.services_by_name["PredictionService"]
    assert {m.name for m in service.methods} == {k.rsplit("/", 1)[1] for k in METHOD_SCOPES}
    admin = {k.rsplit("/", 1)[1] for k, v in METHOD_SCOPES.items() if v == "admin"}
    assert admin == {"CreateDeployment", "UpdateDeployment", "DeleteDeployment", "GetWebhookSecret"}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("wait=3", 3), ("wait", 5), ("respond-async, wait=2", 2), ("handling=lenient", None)],
)
def test_prefer_wait(value: str, seconds: int | None) -> None:
    assert prefer_wait([("prefer", value)], 5) == seconds


@pytest.mark.parametrize("value", ["wait=0", "wait=6", "wait=soon"])
def test_prefer_wait_out_of_range_names_the_header(value: str) -> None:
    with pytest.raises(RpcFailure) as raised:
        prefer_wait([("prefer", value)], 5)
    assert fields_of(raised.value) == {"prefer"}


# --- servicer: create ------------------------------------------------------------------------


async def test_create_stores_the_prediction_and_wakes_the_runner(service: Service) -> None:
    reply = await within(service.servicer.CreatePrediction(create_request(), context()))
    assert reply.status == "starting" and reply.task == "generate" and len(reply.id) == 26
    assert reply.output.WhichOneof("kind") == "null_value"
    assert reply.urls.get == f"{PUBLIC}/v1/predictions/{reply.id}"
    stored = service.store.predictions[reply.id]
    assert stored.owner == "user" and stored.served_model == MODEL
    assert stored.credentials == {"authorization": "Bearer sk-user"}
    assert stored.input == {"prompt": "hi", "parameters": {"max_new_tokens": 8}}
    assert service.runner.wakes == 1
    # The gateway is asked with the caller's own credentials.
    assert service.models.asked_with == [(("authorization", "Bearer sk-user"),)]
    assert service.store.waiting_limit == (100, 1000)


async def test_create_reports_every_bad_field_at_once(service: Service) -> None:
    request = create_request(
        input={"prompt": "x" * 300}, webhook="http://hook.example/", webhook_events_filter=["start", "finish"]
    )
    error = await failure(service.servicer.CreatePrediction(request, context()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields_of(error) == {"input", "webhook", "webhook_events_filter[1]"}
    assert not service.store.predictions


async def test_create_with_an_unknown_model_names_the_known_ones(service: Service) -> None:
    service.store.deployments["poet"] = Deployment("poet", MODEL, "generate")
    error = await failure(service.servicer.CreatePrediction(create_request("nope"), context()))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert MODEL in error.message and "poet" in error.message


async def test_create_without_a_task_names_the_input(service: Service) -> None:
    error = await failure(service.servicer.CreatePrediction(create_request(input={"text": "hi"}), context()))
    assert fields_of(error) == {"input"}


async def test_create_checks_the_input(service: Service) -> None:
    error = await failure(service.servicer.CreatePrediction(create_request(input={"prompt": 3}), context()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(error) == {"input.prompt"}


async def test_create_needs_the_tasks_scope(service: Service) -> None:
    current_key.set(EMBED_ONLY)
    error = await failure(service.servicer.CreatePrediction(create_request(), context()))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED and "'generate'" in error.message
    reply = await within(
        service.servicer.CreatePrediction(create_request(EMBEDDER, input={"input": ["a"]}), context())
    )
    assert reply.task == "embed"


async def test_create_through_a_deployment_merges_its_defaults(service: Service) -> None:
    service.store.deployments["poet"] = Deployment(
        "poet",
        MODEL,
        "generate",
        version="v2",
        defaults={"parameters": {"temperature": 0.2, "max_new_tokens": 4}},
    )
    reply = await within(service.servicer.CreatePrediction(create_request("poet", version="v2"), context()))
    stored = service.store.predictions[reply.id]
    assert (stored.model, stored.version, stored.served_model) == ("poet", "v2", MODEL)
    assert stored.effective_input["parameters"] == {"temperature": 0.2, "max_new_tokens": 8}
    assert stored.input["parameters"] == {"max_new_tokens": 8}
    error = await failure(service.servicer.CreatePrediction(create_request("poet", version="v1"), context()))
    assert fields_of(error) == {"version"}


async def test_create_keeps_the_webhook_filter_in_event_order(service: Service) -> None:
    request = create_request(
        webhook="https://hook.example/", webhook_events_filter=["completed", "start", "start"]
    )
    reply = await within(service.servicer.CreatePrediction(request, context()))
    assert list(reply.webhook_events_filter) == ["start", "completed"]
    everything = await within(
        service.servicer.CreatePrediction(create_request(webhook="https://hook.example/"), context())
    )
    assert list(everything.webhook_events_filter) == ["start", "output", "logs", "completed"]


async def test_a_full_queue_is_refused(service: Service) -> None:
    service.servicer._max_total = 1
    await within(service.servicer.CreatePrediction(create_request(), context()))
    with pytest.raises(QueueFull):
        await within(service.servicer.CreatePrediction(create_request(), context()))


async def test_prefer_wait_returns_the_ended_prediction(service: Service) -> None:
    original = service.store.create

    async def create_and_script(
        new: NewPrediction, max_waiting_per_owner: int, max_waiting_total: int
    ) -> Prediction:
        stored = await original(new, max_waiting_per_owner, max_waiting_total)
        service.changes.steps = [
            dataclasses.replace(stored, status="processing", output={"text": "he"}),
            dataclasses.replace(stored, status="succeeded", output={"generated_text": "hello"}),
        ]
        return stored

    service.store.create = create_and_script  # type: ignore[method-assign]
    reply = await within(service.servicer.CreatePrediction(create_request(), context(("prefer", "wait=2"))))
    assert reply.status == "succeeded"
    assert convert.plain_json(reply.output.struct_value["generated_text"]) == "hello"


async def test_prefer_wait_gives_up_after_the_wait(service: Service) -> None:
    reply = await within(
        service.servicer.CreatePrediction(create_request(), context(("prefer", "wait=1"))), 3
    )
    assert reply.status == "starting"


# --- servicer: get, list, cancel -------------------------------------------------------------


async def test_a_key_sees_only_its_own_predictions_and_admin_sees_all(service: Service) -> None:
    service.store.predictions["p1"] = prediction()
    service.store.predictions["p2"] = prediction(id="p2", owner="other")
    assert (
        await service.servicer.GetPrediction(predictions_pb2.GetPredictionRequest(id="p1"), context())
    ).id == "p1"
    error = await failure(
        service.servicer.GetPrediction(predictions_pb2.GetPredictionRequest(id="p2"), context())
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    listed = await service.servicer.ListPredictions(predictions_pb2.ListPredictionsRequest(), context())
    assert [p.id for p in listed.results] == ["p1"]
    current_key.set(ADMIN)
    listed = await service.servicer.ListPredictions(predictions_pb2.ListPredictionsRequest(), context())
    assert {p.id for p in listed.results} == {"p1", "p2"}


async def test_list_pages_link_with_urls(service: Service) -> None:
    for number in range(5):
        service.store.predictions[f"p{number}"] = prediction(
            id=f"p{number}", created_at=T0 + timedelta(seconds=number)
        )
    request = predictions_pb2.ListPredictionsRequest(page_size=2, status="starting")
    first = await service.servicer.ListPredictions(request, context())
    assert [p.id for p in first.results] == ["p4", "p3"] and first.previous == ""
    assert first.next == f"{PUBLIC}/v1/predictions?cursor=at%3A2&status=starting&page_size=2"
    second = await service.servicer.ListPredictions(
        predictions_pb2.ListPredictionsRequest(cursor="at:2", page_size=2), context()
    )
    assert [p.id for p in second.results] == ["p2", "p1"]
    assert second.previous == f"{PUBLIC}/v1/predictions?cursor=at%3A0&page_size=2"


@pytest.mark.parametrize(
    ("request_fields", "bad"),
    [({"status": "done"}, "status"), ({"page_size": 1001}, "page_size"), ({"cursor": "forged"}, "cursor")],
)
async def test_list_names_the_bad_field(service: Service, request_fields: dict[str, Any], bad: str) -> None:
    error = await failure(
        service.servicer.ListPredictions(predictions_pb2.ListPredictionsRequest(**request_fields), context())
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(error) == {bad}


@pytest.mark.parametrize("page_size", [1001, 2**32 - 1])
async def test_page_size_out_of_range_names_the_range(service: Service, page_size: int) -> None:
    request = predictions_pb2.ListPredictionsRequest(page_size=page_size)
    error = await failure(service.servicer.ListPredictions(request, context()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(error) == {"page_size"}
    assert "1 to 1000" in error.message and str(page_size) in error.message


@pytest.mark.parametrize("page_size", [0, 1, 1000])
async def test_page_size_in_range_or_not_given_is_accepted(service: Service, page_size: int) -> None:
    service.store.predictions["p1"] = prediction()
    request = predictions_pb2.ListPredictionsRequest(page_size=page_size)
    assert [p.id for p in (await service.servicer.ListPredictions(request, context())).results] == ["p1"]


async def test_cancel_a_running_prediction_tells_the_runner(service: Service) -> None:
    service.store.predictions["p1"] = prediction(status="processing")
    reply = await service.servicer.CancelPrediction(
        predictions_pb2.CancelPredictionRequest(id="p1"), context()
    )
    assert reply.status == "processing" and service.runner.cancelled == ["p1"]
    service.store.predictions["p2"] = prediction(id="p2")
    reply = await service.servicer.CancelPrediction(
        predictions_pb2.CancelPredictionRequest(id="p2"), context()
    )
    assert reply.status == "canceled" and service.runner.cancelled == ["p1"]
    error = await failure(
        service.servicer.CancelPrediction(predictions_pb2.CancelPredictionRequest(id="nope"), context())
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


# --- servicer: streams -----------------------------------------------------------------------


async def collect(service: Service, prediction_id: str = "p1") -> list[Any]:
    async def run() -> list[Any]:
        request = predictions_pb2.StreamPredictionRequest(id=prediction_id)
        return [m async for m in service.servicer.StreamPrediction(request, context())]

    return await within(run())


async def test_stream_yields_new_text_then_the_final_message(service: Service) -> None:
    running = prediction(status="processing", output={"text": "he"})
    service.store.predictions["p1"] = running
    service.changes.steps = [
        dataclasses.replace(running, output={"text": "hello"}),
        dataclasses.replace(
            running,
            status="succeeded",
            output={
                "generated_text": "hello world",
                "finish_reason": "FINISH_REASON_LENGTH",
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                "tokens_generated": 3,
                "unknown_field": 1,
            },
        ),
    ]
    messages = await collect(service)
    assert [m.token.text for m in messages[:-1]] == ["he", "llo", " world"]
    final = messages[-1]
    assert final.generated_text == "hello world" and final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert final.usage.total_tokens == 4 and final.request_id == "p1"


async def test_stream_of_a_math_prediction_carries_the_answer(service: Service) -> None:
    service.store.predictions["p1"] = prediction(
        task="math", status="succeeded", output={"solution": "2+2=4", "answer": "4"}
    )
    messages = await collect(service)
    assert messages[0].token.text == "2+2=4" and messages[-1].answer == "4"


async def test_stream_of_a_failed_prediction_fails_with_its_error(service: Service) -> None:
    service.store.predictions["p1"] = prediction(status="failed", error="out of memory")
    with pytest.raises(RpcFailure, match="out of memory"):
        await collect(service)


async def test_stream_of_a_canceled_prediction_ends_unspecified(service: Service) -> None:
    service.store.predictions["p1"] = prediction(status="canceled", output={"text": "par"})
    messages = await collect(service)
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert messages[-1].generated_text == "par"


def restart_reason(error: RpcFailure) -> str:
    return next(str(d.reason) for d in error.details if isinstance(d, error_details_pb2.ErrorInfo))


async def test_a_rerun_that_repeats_the_text_keeps_streaming(service: Service) -> None:
    first = prediction(status="processing", attempt=1, output={"text": "hello"})
    service.store.predictions["p1"] = first
    # The worker was lost; the rerun starts over and (greedy decoding) writes the same text.
    service.changes.steps = [
        dataclasses.replace(first, attempt=2),
        dataclasses.replace(first, attempt=2, output={"text": "he"}),
        dataclasses.replace(first, attempt=2, output={"text": "hello w"}),
        dataclasses.replace(first, attempt=2, status="succeeded", output={"generated_text": "hello world"}),
    ]
    messages = await collect(service)
    assert [m.token.text for m in messages[:-1]] == ["hello", " w", "orld"]
    assert messages[-1].generated_text == "hello world"


async def test_a_rerun_with_other_text_ends_the_stream_as_restarted(service: Service) -> None:
    first = prediction(status="processing", attempt=1, output={"text": "hello wor"})
    service.store.predictions["p1"] = first
    service.changes.steps = [
        dataclasses.replace(first, attempt=2),  # the old run's text, until the rerun saves its own
        dataclasses.replace(first, attempt=2, output={"text": "he"}),
        dataclasses.replace(first, attempt=2, output={"text": "help me"}),
        dataclasses.replace(first, attempt=2, status="succeeded", output={"generated_text": "help me now"}),
    ]
    received: list[str] = []

    async def run() -> None:
        request = predictions_pb2.StreamPredictionRequest(id="p1")
        async for message in service.servicer.StreamPrediction(request, context()):
            received.append(message.token.text)

    error = await failure(run())
    assert received == ["hello wor"]
    assert error.code == grpc.StatusCode.ABORTED and restart_reason(error) == "PREDICTION_RESTARTED"
    assert "run 2" in error.message and "stream it again" in error.message
    # A stream joined after the restart follows the new run from its start.
    assert [m.token.text for m in (await collect(service))[:-1]] == ["help me", " now"]


async def test_a_rerun_that_ends_with_other_text_is_restarted_not_a_wrong_final(service: Service) -> None:
    first = prediction(status="processing", attempt=1, output={"text": "hello"})
    service.store.predictions["p1"] = first
    service.changes.steps = [
        dataclasses.replace(first, attempt=2, status="succeeded", output={"generated_text": "goodbye"})
    ]
    error = await failure(collect(service))
    assert error.code == grpc.StatusCode.ABORTED and restart_reason(error) == "PREDICTION_RESTARTED"


async def test_a_restart_is_an_in_band_error_event_over_sse(service: Service) -> None:
    first = prediction(status="processing", attempt=1, output={"text": "hello"})
    service.store.predictions["p1"] = first
    service.changes.steps = [dataclasses.replace(first, attempt=2, output={"text": "bye"})]

    async def run() -> list[bytes]:
        request = predictions_pb2.StreamPredictionRequest(id="p1")
        return [e.data async for e in service.servicer.StreamPredictionEvents(request, context())]

    # Events queued while a write waits share one chunk: split the stream, not the chunks.
    events = [e for e in b"".join(await within(run())).split(b"\n\n") if e]
    assert json.loads(events[0][6:])["token"]["text"] == "hello"
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == grpc.StatusCode.ABORTED.value[0] and "run 2" in error["message"]


def test_text_follower_sends_only_what_continues_the_sent_text() -> None:
    follower = TextFollower()
    assert [follower.delta(t) for t in ["", "ab", "abc", "a", "abc", "abcd"]] == ["", "ab", "c", "", "", "d"]
    with pytest.raises(TextDiverged):
        follower.delta("abx")
    assert follower.sent == "abcd"


async def test_stream_events_frame_sse(service: Service) -> None:
    service.store.predictions["p1"] = prediction(status="succeeded", output={"generated_text": "ok"})

    async def run() -> list[bytes]:
        request = predictions_pb2.StreamPredictionRequest(id="p1")
        return [e.data async for e in service.servicer.StreamPredictionEvents(request, context())]

    chunks = await within(run())
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)  # a chunk holds whole events
    events = [e for e in b"".join(chunks).split(b"\n\n") if e]
    assert events[0].startswith(b"data: {") and events[-1] == b"data: [DONE]"
    assert json.loads(events[1][6:])["generated_text"] == "ok"


# --- servicer: deployments and the secret ----------------------------------------------------


def deployment_request(**fields: Any) -> predictions_pb2.CreateDeploymentRequest:
    schema = fields.pop("input_schema", None)
    message = predictions_pb2.Deployment(**{"name": "poet", "model": MODEL, "task": "generate", **fields})
    if schema is not None:
        message.input_schema.update(schema)
    return predictions_pb2.CreateDeploymentRequest(deployment=message)


async def test_deployment_crud(service: Service) -> None:
    created = await service.servicer.CreateDeployment(
        deployment_request(input_schema={"type": "object", "required": ["prompt"]}), context()
    )
    assert created.version == "1" and created.input_schema["required"] == ["prompt"]
    error = await failure(service.servicer.CreateDeployment(deployment_request(), context()))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    update = predictions_pb2.UpdateDeploymentRequest(name="poet", version="v2")
    assert (await service.servicer.UpdateDeployment(update, context())).version == "v2"
    listed = await service.servicer.ListDeployments(predictions_pb2.ListDeploymentsRequest(), context())
    assert [d.name for d in listed.results] == ["poet"]
    await service.servicer.DeleteDeployment(predictions_pb2.DeleteDeploymentRequest(name="poet"), context())
    error = await failure(
        service.servicer.GetDeployment(predictions_pb2.GetDeploymentRequest(name="poet"), context())
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_deployment_fields_are_checked(service: Service) -> None:
    request = deployment_request(name="Bad Name", model="", task="sing", input_schema={"type": "nonsense"})
    error = await failure(service.servicer.CreateDeployment(request, context()))
    assert fields_of(error) == {
        "deployment.name",
        "deployment.model",
        "deployment.task",
        "deployment.input_schema",
    }
    update = predictions_pb2.UpdateDeploymentRequest(name="poet", task="sing")
    update.input_schema.update({"required": "prompt"})
    error = await failure(service.servicer.UpdateDeployment(update, context()))
    assert fields_of(error) == {"task", "input_schema"}


async def test_a_schema_whose_ref_resolves_nowhere_is_refused_on_the_deployment(service: Service) -> None:
    schema = {"type": "object", "properties": {"prompt": {"$ref": "#/$defs/text"}}}
    error = await failure(
        service.servicer.CreateDeployment(deployment_request(input_schema=schema), context())
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields_of(error) == {"deployment.input_schema"} and "$ref" in error.message
    update = predictions_pb2.UpdateDeploymentRequest(name="poet")
    update.input_schema.update({"$ref": "https://schemas.example/poet.json"})
    error = await failure(service.servicer.UpdateDeployment(update, context()))
    assert fields_of(error) == {"input_schema"}


async def test_a_stored_schema_that_cannot_be_applied_is_a_400_on_input(service: Service) -> None:
    # Stored before the deployment checks resolved references.
    service.store.deployments["poet"] = Deployment(
        "poet", MODEL, "generate", input_schema={"$ref": "#/$defs/nowhere"}
    )
    error = await failure(service.servicer.CreatePrediction(create_request("poet"), context()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(error) == {"input"}
    assert not service.store.predictions


async def test_webhook_secret(service: Service) -> None:
    reply = await service.servicer.GetWebhookSecret(predictions_pb2.GetWebhookSecretRequest(), context())
    assert reply.key == SECRET


def test_value_of_none_is_null() -> None:
    assert convert.to_value(None).WhichOneof("kind") == "null_value"
    assert json_format.MessageToDict(convert.to_value({"a": [1]})) == {"a": [1.0]}
    assert convert.to_value("x").string_value == "x"


def test_a_full_queue_maps_to_resource_exhausted_with_retry_info() -> None:
    mapped = MAPPING.failure_of(QueueFull("owner", 100))
    assert mapped is not None and mapped.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100" in mapped.message
    retry = next(d for d in mapped.details if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.ToTimedelta() > timedelta(0)


async def test_non_finite_numbers_in_json_fields_are_refused_by_path(service: Service) -> None:
    """Regression (fuzzing): json_format cannot print NaN or infinities, so an input or a
    deployment holding one (a gRPC client can send them) was an INTERNAL error."""
    request = create_request()
    request.input.fields["parameters"].struct_value.fields["temperature"].number_value = float("inf")
    error = await failure(service.servicer.CreatePrediction(request, context()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields_of(error) == {"input.parameters.temperature"} and not service.store.predictions
    deployment = deployment_request(input_schema={"type": "object"})
    deployment.deployment.defaults["top_p"] = float("nan")
    error = await failure(service.servicer.CreateDeployment(deployment, context()))
    assert fields_of(error) == {"deployment.defaults.top_p"}
    update = predictions_pb2.UpdateDeploymentRequest(name="poet")
    update.input_schema.update({"maximum": float("-inf")})
    error = await failure(service.servicer.UpdateDeployment(update, context()))
    assert fields_of(error) == {"input_schema.maximum"}
