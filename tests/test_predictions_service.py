"""The predictions service as a real process (`python -m services.predictions`) over gRPC, in
front of the shared stack's gateway with the same key file and a temporary SQLite database:
create (with `prefer: wait`), get, list pages, cancel, field errors, owners, admin-only changes
and the output stream."""

from __future__ import annotations

import http.server
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status
from inference.v1 import info_pb2, info_pb2_grpc, predictions_pb2, predictions_pb2_grpc
from standardwebhooks import Webhook

from tests import fixtures_predictions
from tests.fixtures_gateway import GatewayService
from tests.fixtures_postgres import PostgresServer
from tests.stack import ServiceProcess
from tests.test_generation_penalties import bad_fields

PUBLIC = "http://predictions.test:8080"


@dataclass
class Predictions:
    stub: predictions_pb2_grpc.PredictionServiceStub
    gateway: GatewayService
    model: str
    process: ServiceProcess
    # A new empty database of the same kind.
    fresh_url: Callable[[], str]

    def metadata(self, name: str = "user", *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (*self.gateway.metadata(name), *extra)


def start_predictions(gateway: GatewayService, database_url: str) -> tuple[ServiceProcess, str]:
    """`python -m services.predictions` on a free port over `database_url`, serving."""
    service = fixtures_predictions.start_predictions(
        gateway, database_url, args=("--poll-seconds", "0.1"), public_url=PUBLIC, timeout=60
    )
    return service.process, service.address


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def predictions(
    request: pytest.FixtureRequest, gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Predictions]:
    """The service over a temporary SQLite file, then over a fresh database on the tests'
    PostgreSQL server (skipped where PostgreSQL is not installed)."""
    if request.param == "sqlite":
        folder = Path(tmp_path_factory.mktemp("predictions"))
        fresh_url: Callable[[], str] = lambda: f"sqlite+aiosqlite:///{folder / secrets.token_hex(4)}.db"  # noqa: E731
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        fresh_url = server.create_database
    process, address = start_predictions(gateway_service, fresh_url())
    try:
        with grpc.insecure_channel(gateway_service.address) as gateway:
            served = info_pb2_grpc.InfoServiceStub(gateway).ListServedModels(
                info_pb2.ListServedModelsRequest(), timeout=30, metadata=gateway_service.metadata()
            )
        model = next(m.id for m in served.models if m.task == "generation")
        with grpc.insecure_channel(address) as channel:
            yield Predictions(
                predictions_pb2_grpc.PredictionServiceStub(channel),
                gateway_service,
                model,
                process,
                fresh_url,
            )
    finally:
        process.stop()


def create_request(
    model: str, prompt: str = "Once upon a time", tokens: int = 6
) -> predictions_pb2.CreatePredictionRequest:
    request = predictions_pb2.CreatePredictionRequest(model=model)
    request.input.update({"prompt": prompt, "parameters": {"max_new_tokens": tokens, "temperature": 0}})
    return request


def wait_until_ended(
    predictions: Predictions, prediction_id: str, timeout: float = 120, key: str = "user"
) -> predictions_pb2.Prediction:
    deadline = time.monotonic() + timeout
    while True:
        reply = predictions.stub.GetPrediction(
            predictions_pb2.GetPredictionRequest(id=prediction_id),
            timeout=10,
            metadata=predictions.metadata(key),
        )
        if reply.status in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_create_with_prefer_wait_returns_the_finished_prediction(predictions: Predictions) -> None:
    reply = predictions.stub.CreatePrediction(
        create_request(predictions.model),
        timeout=120,
        metadata=predictions.metadata("user", ("prefer", "wait=60")),
    )
    assert reply.status == "succeeded", reply.error
    output = json_format.MessageToDict(reply.output)
    assert output["generated_text"]
    assert reply.task == "generate" and reply.model == predictions.model
    assert reply.urls.get == f"{PUBLIC}/v1/predictions/{reply.id}"
    assert reply.HasField("started_at") and reply.HasField("completed_at")
    assert reply.metrics.predict_time > 0
    again = predictions.stub.GetPrediction(
        predictions_pb2.GetPredictionRequest(id=reply.id), timeout=10, metadata=predictions.metadata()
    )
    assert again.status == "succeeded" and again.output == reply.output


def test_create_then_poll(predictions: Predictions) -> None:
    reply = predictions.stub.CreatePrediction(
        create_request(predictions.model), timeout=30, metadata=predictions.metadata()
    )
    assert reply.status == "starting"
    assert reply.output.WhichOneof("kind") == "null_value"
    assert wait_until_ended(predictions, reply.id).status == "succeeded"


def test_list_pages_newest_first_and_only_the_keys_own(predictions: Predictions) -> None:
    ids = [
        predictions.stub.CreatePrediction(
            create_request(predictions.model, tokens=1), timeout=30, metadata=predictions.metadata("limited")
        ).id
        for _ in range(3)
    ]
    first = predictions.stub.ListPredictions(
        predictions_pb2.ListPredictionsRequest(page_size=2),
        timeout=10,
        metadata=predictions.metadata("limited"),
    )
    assert [p.id for p in first.results] == ids[::-1][:2]
    assert first.next.startswith(f"{PUBLIC}/v1/predictions?cursor=") and first.previous == ""
    cursor = parse_qs(urlsplit(first.next).query)["cursor"][0]
    second = predictions.stub.ListPredictions(
        predictions_pb2.ListPredictionsRequest(page_size=2, cursor=cursor),
        timeout=10,
        metadata=predictions.metadata("limited"),
    )
    assert [p.id for p in second.results] == ids[:1]
    # Another key does not see them; the admin key does.
    mine = predictions.stub.ListPredictions(
        predictions_pb2.ListPredictionsRequest(page_size=1000),
        timeout=10,
        metadata=predictions.metadata("user"),
    )
    assert not set(ids) & {p.id for p in mine.results}
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.GetPrediction(
            predictions_pb2.GetPredictionRequest(id=ids[0]), timeout=10, metadata=predictions.metadata("user")
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    everyone = predictions.stub.ListPredictions(
        predictions_pb2.ListPredictionsRequest(page_size=1000),
        timeout=10,
        metadata=predictions.metadata("admin"),
    )
    assert set(ids) <= {p.id for p in everyone.results}
    for prediction_id in ids:
        assert wait_until_ended(predictions, prediction_id, key="limited").status == "succeeded"


def test_cancel(predictions: Predictions) -> None:
    reply = predictions.stub.CreatePrediction(
        create_request(predictions.model, tokens=200), timeout=30, metadata=predictions.metadata()
    )
    canceled = predictions.stub.CancelPrediction(
        predictions_pb2.CancelPredictionRequest(id=reply.id), timeout=30, metadata=predictions.metadata()
    )
    assert canceled.id == reply.id
    ended = wait_until_ended(predictions, reply.id)
    assert ended.status == "canceled"
    assert ended.HasField("completed_at")


def test_bad_fields_are_named(predictions: Predictions) -> None:
    request = create_request(predictions.model)
    request.webhook = "ftp://example.com/hook"
    request.webhook_events_filter.extend(["start", "done"])
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.CreatePrediction(request, timeout=30, metadata=predictions.metadata())
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(failed.value) == {"webhook", "webhook_events_filter[1]"}
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.ListPredictions(
            predictions_pb2.ListPredictionsRequest(status="done", cursor="forged"),
            timeout=10,
            metadata=predictions.metadata(),
        )
    assert bad_fields(failed.value) == {"status"}
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.ListPredictions(
            predictions_pb2.ListPredictionsRequest(cursor="forged"),
            timeout=10,
            metadata=predictions.metadata(),
        )
    assert bad_fields(failed.value) == {"cursor"}
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.ListPredictions(
            predictions_pb2.ListPredictionsRequest(page_size=1001),
            timeout=10,
            metadata=predictions.metadata(),
        )
    assert bad_fields(failed.value) == {"page_size"} and "1 to 1000" in (failed.value.details() or "")
    untasked = predictions_pb2.CreatePredictionRequest(model=predictions.model)
    untasked.input.update({"text": "hi"})
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.CreatePrediction(untasked, timeout=30, metadata=predictions.metadata())
    assert bad_fields(failed.value) == {"input"}


def test_unknown_model_is_not_found_naming_the_served_ones(predictions: Predictions) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.CreatePrediction(
            create_request("no-such-model"), timeout=30, metadata=predictions.metadata()
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert predictions.model in (failed.value.details() or "")


def test_keys_are_checked(predictions: Predictions) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.GetPrediction(predictions_pb2.GetPredictionRequest(id="x"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.CreatePrediction(
            create_request(predictions.model), timeout=30, metadata=predictions.metadata("embed-only")
        )
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_deployments_need_admin_to_change(predictions: Predictions) -> None:
    deployment = predictions_pb2.Deployment(
        name="storyteller", model=predictions.model, task="generate", version="v1"
    )
    deployment.defaults.update({"parameters": {"max_new_tokens": 3, "temperature": 0}})
    deployment.input_schema.update(
        {
            "type": "object",
            "required": ["prompt"],
            "properties": {"prompt": {"type": "string", "maxLength": 40}},
        }
    )
    request = predictions_pb2.CreateDeploymentRequest(deployment=deployment)
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.CreateDeployment(request, timeout=10, metadata=predictions.metadata("user"))
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    created = predictions.stub.CreateDeployment(request, timeout=10, metadata=predictions.metadata("admin"))
    assert created.name == "storyteller" and created.version == "v1"
    try:
        read = predictions.stub.GetDeployment(
            predictions_pb2.GetDeploymentRequest(name="storyteller"),
            timeout=10,
            metadata=predictions.metadata(),
        )
        assert read.model == predictions.model
        with pytest.raises(grpc.RpcError) as failed:
            predictions.stub.CreateDeployment(request, timeout=10, metadata=predictions.metadata("admin"))
        assert failed.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # The deployment's schema checks the input before anything is stored.
        with pytest.raises(grpc.RpcError) as failed:
            predictions.stub.CreatePrediction(
                create_request("storyteller", prompt="x" * 100), timeout=30, metadata=predictions.metadata()
            )
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(failed.value) == {"input.prompt"}
        bad_schema = predictions_pb2.UpdateDeploymentRequest(name="storyteller")
        bad_schema.input_schema.update({"type": "nonsense"})
        with pytest.raises(grpc.RpcError) as failed:
            predictions.stub.UpdateDeployment(bad_schema, timeout=10, metadata=predictions.metadata("admin"))
        assert bad_fields(failed.value) == {"input_schema"}
        # A $ref that resolves nowhere passes check_schema; it would fail every create later.
        bad_schema = predictions_pb2.UpdateDeploymentRequest(name="storyteller")
        bad_schema.input_schema.update({"properties": {"prompt": {"$ref": "#/$defs/nowhere"}}})
        with pytest.raises(grpc.RpcError) as failed:
            predictions.stub.UpdateDeployment(bad_schema, timeout=10, metadata=predictions.metadata("admin"))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(failed.value) == {"input_schema"}
        reply = predictions.stub.CreatePrediction(
            create_request("storyteller", prompt="Hello", tokens=2),
            timeout=120,
            metadata=predictions.metadata("user", ("prefer", "wait=60")),
        )
        assert reply.status == "succeeded" and reply.version == "v1", reply.error
    finally:
        predictions.stub.DeleteDeployment(
            predictions_pb2.DeleteDeploymentRequest(name="storyteller"),
            timeout=10,
            metadata=predictions.metadata("admin"),
        )
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.GetDeployment(
            predictions_pb2.GetDeploymentRequest(name="storyteller"),
            timeout=10,
            metadata=predictions.metadata(),
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_webhook_secret_is_admin_only(predictions: Predictions) -> None:
    secret = predictions.stub.GetWebhookSecret(
        predictions_pb2.GetWebhookSecretRequest(), timeout=10, metadata=predictions.metadata("admin")
    )
    assert secret.key.startswith("whsec_")
    with pytest.raises(grpc.RpcError) as failed:
        predictions.stub.GetWebhookSecret(
            predictions_pb2.GetWebhookSecretRequest(), timeout=10, metadata=predictions.metadata("user")
        )
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = rpc_status.from_call(failed.value)
    assert status is not None and status.details


def test_stream_yields_the_text(predictions: Predictions) -> None:
    reply = predictions.stub.CreatePrediction(
        create_request(predictions.model, tokens=8), timeout=30, metadata=predictions.metadata()
    )
    messages = list(
        predictions.stub.StreamPrediction(
            predictions_pb2.StreamPredictionRequest(id=reply.id), timeout=120, metadata=predictions.metadata()
        )
    )
    final = messages[-1]
    assert final.generated_text
    assert "".join(m.token.text for m in messages[:-1]) == final.generated_text
    assert final.usage.completion_tokens > 0


def test_a_restart_keeps_predictions_and_the_webhook_secret(predictions: Predictions) -> None:
    database = predictions.fresh_url()
    admin = predictions.metadata("admin")
    process, address = start_predictions(predictions.gateway, database)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = predictions_pb2_grpc.PredictionServiceStub(channel)
            created = stub.CreatePrediction(
                create_request(predictions.model, tokens=2),
                timeout=120,
                metadata=(*admin, ("prefer", "wait=60")),
            )
            secret = stub.GetWebhookSecret(
                predictions_pb2.GetWebhookSecretRequest(), timeout=10, metadata=admin
            )
    finally:
        # SIGTERM is a clean stop.
        assert process.stop() == 0, process.log_tail()
    assert created.status == "succeeded", created.error
    process, address = start_predictions(predictions.gateway, database)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = predictions_pb2_grpc.PredictionServiceStub(channel)
            again = stub.GetPrediction(
                predictions_pb2.GetPredictionRequest(id=created.id), timeout=10, metadata=admin
            )
            assert again.status == "succeeded" and again.output == created.output
            kept = stub.GetWebhookSecret(
                predictions_pb2.GetWebhookSecretRequest(), timeout=10, metadata=admin
            )
            assert kept.key == secret.key
    finally:
        process.stop()


class Receiver(http.server.ThreadingHTTPServer):
    """A loopback webhook receiver that keeps each request's headers and body."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhooks_carry_the_prediction_json_signed_with_the_secret(
    predictions: Predictions, receiver: Receiver
) -> None:
    request = create_request(predictions.model, tokens=3)
    request.webhook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    request.webhook_events_filter.extend(["start", "completed"])
    created = predictions.stub.CreatePrediction(
        request, timeout=120, metadata=predictions.metadata("user", ("prefer", "wait=60"))
    )
    assert created.status == "succeeded", created.error
    secret = predictions.stub.GetWebhookSecret(
        predictions_pb2.GetWebhookSecretRequest(), timeout=10, metadata=predictions.metadata("admin")
    )
    deadline = time.monotonic() + 30
    while len(receiver.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    verifier = Webhook(secret.key)
    bodies = [verifier.verify(body, headers) for headers, body in receiver.received]
    # Each event is its own delivery, so the two may arrive in either order.
    assert sorted(b["status"] for b in bodies) == ["processing", "succeeded"]
    final = next(b for b in bodies if b["status"] == "succeeded")
    assert final["id"] == created.id and final["output"]["generated_text"]
    assert final["urls"]["get"] == f"{PUBLIC}/v1/predictions/{created.id}"
    assert final["error"] == "" and "credentials" not in final
