"""The typed predictions client (sync and asyncio) against the real predictions service, which
runs each prediction through the real gateway with the client's key: create, wait, get, list
with cursors and a status filter, stream, cancel, deployments, the webhook secret, and the
service's refusals as the client's typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from inference_client import (
    AsyncPredictionsClient,
    InferenceClient,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    PredictionsClient,
    UnauthenticatedError,
)

from tests.fixtures_gateway import GatewayService
from tests.fixtures_predictions import start_predictions

TIMEOUT = 120.0
SHORT = {"max_new_tokens": 8, "temperature": 0}


@dataclass
class PredictionsService:
    address: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
def predictions_service(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictionsService]:
    """`python -m services.predictions` on free ports and a SQLite file, with the gateway's keys."""
    database = Path(tmp_path_factory.mktemp("predictions")) / "predictions.db"
    service = start_predictions(
        gateway_service, f"sqlite+aiosqlite:///{database}", args=(), public_url="http://localhost:8080"
    )
    try:
        yield PredictionsService(service.address, gateway_service.keys)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def model(gateway_service: GatewayService) -> str:
    """The id the gateway serves its generation model under."""
    with InferenceClient(gateway_service.address, api_key=gateway_service.keys["user"]) as client:
        served = client.models()
    return next(item.id for item in served if "embed" not in item.task.lower())


def connect(service: PredictionsService, key: str = "user") -> PredictionsClient:
    return PredictionsClient(service.address, api_key=service.keys[key], timeout=TIMEOUT)


def test_create_with_wait_returns_the_finished_prediction(
    predictions_service: PredictionsService, model: str
) -> None:
    with connect(predictions_service) as client:
        created = client.create(model, {"prompt": "The capital of France is", "parameters": SHORT}, wait=60)
        assert created.status == "succeeded", created
        assert created.done and created.error == ""
        assert created.task == "generate" and created.model == model
        assert created.input == {"prompt": "The capital of France is", "parameters": SHORT}
        assert isinstance(created.output, dict) and created.output["generated_text"]
        assert created.started_at is not None and created.completed_at is not None
        assert created.created_at <= created.started_at <= created.completed_at
        assert created.metrics.predict_time > 0 and created.metrics.output_token_count > 0
        assert created.urls.get.endswith(f"/v1/predictions/{created.id}")
        assert created.urls.cancel.endswith(f"/v1/predictions/{created.id}/cancel")
        fetched = client.get(created.id)
    assert fetched.id == created.id and fetched.output == created.output


def test_wait_polls_until_the_prediction_ends(predictions_service: PredictionsService, model: str) -> None:
    with connect(predictions_service) as client:
        created = client.create(model, {"prompt": "One, two,", "parameters": SHORT})
        assert created.status in ("starting", "processing", "succeeded")
        assert created.output is None or created.status != "starting"
        done = client.wait(created.id, timeout=TIMEOUT)
    assert done.status == "succeeded" and done.output["generated_text"]


def test_stream_yields_the_text_the_prediction_ends_with(
    predictions_service: PredictionsService, model: str
) -> None:
    with connect(predictions_service) as client:
        created = client.create(model, {"prompt": "Once upon a time", "parameters": SHORT})
        chunks = list(client.stream(created.id))
        done = client.wait(created.id, timeout=TIMEOUT)
    assert chunks and "".join(chunks) == done.output["generated_text"]


def test_cancel_ends_a_long_prediction(predictions_service: PredictionsService, model: str) -> None:
    with connect(predictions_service) as client:
        created = client.create(
            model, {"prompt": "Count to ten thousand:", "parameters": {"max_new_tokens": 2000}}
        )
        canceled = client.cancel(created.id)
        assert canceled.status in ("canceled", "processing")
        done = client.wait(created.id, timeout=TIMEOUT)
    assert done.status == "canceled", done


def test_list_pages_newest_first_with_cursors_and_a_status_filter(
    predictions_service: PredictionsService, model: str
) -> None:
    with connect(predictions_service) as client:
        made = [
            client.create(model, {"prompt": f"Item {n}:", "parameters": SHORT}, wait=60) for n in range(3)
        ]
        first = client.list(page_size=2)
        assert [p.id for p in first.results] == [made[2].id, made[1].id]
        assert first.previous_cursor is None and first.next_cursor
        # Older ones (other tests') may follow on the same page.
        second = client.list(page_size=2, cursor=first.next_cursor)
        assert second.results[0].id == made[0].id and second.previous_cursor
        back = client.list(page_size=2, cursor=second.previous_cursor)
        assert [p.id for p in back.results] == [made[2].id, made[1].id]
        succeeded = client.list(status="succeeded", page_size=1000).results
        assert {p.id for p in made} <= {p.id for p in succeeded}
        assert {p.status for p in succeeded} == {"succeeded"}
        with pytest.raises(InvalidArgumentError) as caught:
            client.list(status="finished")
    assert caught.value.field_violations[0].field == "status"


def test_a_key_sees_only_its_own_predictions(predictions_service: PredictionsService, model: str) -> None:
    with connect(predictions_service) as owner:
        created = owner.create(model, {"prompt": "Mine:", "parameters": SHORT})
    with connect(predictions_service, "embed-only") as other, pytest.raises(NotFoundError):
        other.get(created.id)
    with connect(predictions_service, "admin") as admin:
        assert admin.get(created.id).id == created.id
        admin.wait(created.id, timeout=TIMEOUT)


def test_bad_input_and_bad_keys_are_typed_errors(predictions_service: PredictionsService, model: str) -> None:
    with connect(predictions_service) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.create(model, {"prompt": "x", "parameters": {"temperature": "hot"}})
        assert caught.value.field_violations
        assert caught.value.field_violations[0].field.startswith("input.parameters")
        with pytest.raises(NotFoundError):
            client.get("no-such-prediction")
    stranger = PredictionsClient(predictions_service.address, api_key="sk-wrong")
    with stranger, pytest.raises(UnauthenticatedError):
        stranger.list()


def test_deployments_are_read_by_any_key_and_changed_by_an_admin(
    predictions_service: PredictionsService, model: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"prompt": {"type": "string", "maxLength": 40}},
        "required": ["prompt"],
    }
    with connect(predictions_service, "admin") as admin, connect(predictions_service) as user:
        made = admin.create_deployment(
            "short-story",
            model,
            "generate",
            version="v1",
            defaults={"parameters": SHORT},
            input_schema=schema,
            description="short completions",
        )
        assert (made.name, made.model, made.task, made.version) == ("short-story", model, "generate", "v1")
        assert made.defaults == {"parameters": SHORT} and made.input_schema == schema
        assert made.created_at is not None
        assert user.get_deployment("short-story") == made
        assert "short-story" in {item.name for item in user.list_deployments()}
        with pytest.raises(PermissionDeniedError):
            user.update_deployment("short-story", description="mine now")

        done = user.create("short-story", {"prompt": "The sea"}, wait=60)
        assert done.status == "succeeded" and done.version == "v1"
        with pytest.raises(InvalidArgumentError) as caught:
            user.create("short-story", {"prompt": "x" * 41})
        assert caught.value.field_violations[0].field == "input.prompt"

        changed = admin.update_deployment("short-story", version="v2")
        assert changed.version == "v2" and changed.description == "short completions"
        admin.delete_deployment("short-story")
        with pytest.raises(NotFoundError):
            user.get_deployment("short-story")


def test_the_webhook_secret_is_for_admins(predictions_service: PredictionsService) -> None:
    with connect(predictions_service, "admin") as admin:
        secret = admin.webhook_secret()
        assert secret.startswith("whsec_") and admin.webhook_secret() == secret
    with connect(predictions_service) as user, pytest.raises(PermissionDeniedError):
        user.webhook_secret()


def test_the_asyncio_client_creates_streams_and_waits(
    predictions_service: PredictionsService, model: str
) -> None:
    async def scenario() -> tuple[str, str]:
        async with AsyncPredictionsClient(
            predictions_service.address, api_key=predictions_service.keys["user"], timeout=TIMEOUT
        ) as client:
            created = await client.create(model, {"prompt": "Roses are red,", "parameters": SHORT})
            chunks = [chunk async for chunk in client.stream(created.id)]
            done = await client.wait(created.id, timeout=TIMEOUT)
            assert (await client.get(created.id)).status == "succeeded"
            assert created.id in {p.id for p in (await client.list(page_size=50)).results}
            return "".join(chunks), done.output["generated_text"]

    streamed, final = asyncio.run(scenario())
    assert streamed and streamed == final
