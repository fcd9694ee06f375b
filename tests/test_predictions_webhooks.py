"""Webhooks over the real stack, against SQLite and PostgreSQL: a receiver in this process gets
`start`, `output` and `completed`, each signed with the secret an admin reads at
GET /v1/webhooks/default/secret (checked with the `standardwebhooks` package); a receiver that
fails the first three attempts still gets `completed`, under the same webhook-id every time; a
loopback webhook is refused unless private addresses are allowed."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from inference.v1 import info_pb2, info_pb2_grpc, predictions_pb2, predictions_pb2_grpc
from standardwebhooks import Webhook, WebhookVerificationError

from tests.fixtures_gateway import GatewayService
from tests.fixtures_predictions import FAST_FLAGS, PredictionsStack, sqlite_url, start_predictions
from tests.webhook_receiver import Received, webhook_receiver


def served_generation_model(stack: PredictionsStack) -> str:
    status, _, reply = stack.request("GET", "/models")
    assert status == 200, reply
    return str(next(m["id"] for m in reply["models"] if m["task"] == "generation"))


def webhook_secret(stack: PredictionsStack) -> str:
    status, _, reply = stack.request("GET", "/v1/webhooks/default/secret", key="admin")
    assert status == 200, reply
    key: str = reply["key"]
    assert key.startswith("whsec_") and len(base64.b64decode(key.removeprefix("whsec_"))) >= 24
    return key


def completed(prediction_id: str) -> Any:
    def done(received: list[Received]) -> bool:
        return any(
            r.answered == 200 and r.event == "completed" and r.prediction["id"] == prediction_id
            for r in received
        )

    return done


def test_the_secret_is_for_admins_only(predictions_stack: PredictionsStack) -> None:
    status, _, reply = predictions_stack.request("GET", "/v1/webhooks/default/secret", key="user")
    assert status == 403, reply
    assert webhook_secret(predictions_stack) == webhook_secret(predictions_stack)


def test_a_receiver_gets_start_output_and_completed_with_valid_signatures(
    predictions_stack: PredictionsStack,
) -> None:
    secret = webhook_secret(predictions_stack)
    with webhook_receiver(secret) as receiver:
        created = predictions_stack.create(
            {
                "model": served_generation_model(predictions_stack),
                # Greedy, this story runs past 3,000 tokens: 120 of them take several progress ticks.
                "input": {
                    "messages": [
                        {"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}
                    ],
                    "parameters": {"max_new_tokens": 120, "do_sample": False},
                },
                "webhook": receiver.url,
                "webhook_events_filter": ["start", "output", "completed"],
            }
        )
        received = receiver.wait_for(completed(created["id"]), timeout=120)
    mine = [r for r in received if r.prediction["id"] == created["id"]]
    assert mine, f"no webhook arrived: {received}"
    assert all(r.problem is None and r.answered == 200 for r in mine), [(r.problem, r.answered) for r in mine]
    events = [r.event for r in mine]
    assert events[0] == "start" and events[-1] == "completed" and "output" in events, events
    assert events.count("start") == 1 and events.count("completed") == 1, events
    # Every event is its own message: a receiver deduplicates on webhook-id.
    assert len({r.webhook_id for r in mine}) == len(mine)
    assert all(r.headers["content-type"].startswith("application/json") for r in mine)
    final = mine[-1].prediction
    assert final["status"] == "succeeded"
    assert final == predictions_stack.get(created["id"])
    # Output events carry the partial text, growing.
    partial = [r.prediction["output"]["text"] for r in mine if r.event == "output"]
    assert all(final["output"]["message"]["content"].startswith(text) for text in partial), partial
    assert partial == sorted(partial, key=len)
    # The signature is over these bytes with this secret: another secret does not verify them.
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(mine[-1].body, mine[-1].headers)


def test_a_receiver_failing_three_times_still_gets_completed_under_one_id(
    predictions_stack: PredictionsStack,
) -> None:
    secret = webhook_secret(predictions_stack)
    with webhook_receiver(secret, fail_first=3) as receiver:
        created = predictions_stack.create(
            {
                "model": served_generation_model(predictions_stack),
                "input": {"prompt": "Hello", "parameters": {"max_new_tokens": 4, "do_sample": False}},
                "webhook": receiver.url,
                "webhook_events_filter": ["completed"],
            }
        )
        received = receiver.wait_for(completed(created["id"]), timeout=90)
    attempts = [r for r in received if r.prediction["id"] == created["id"]]
    assert [r.answered for r in attempts] == [500, 500, 500, 200], [(r.answered, r.problem) for r in attempts]
    assert len({r.webhook_id for r in attempts}) == 1
    assert len({r.body for r in attempts}) == 1
    assert all(r.problem is None for r in attempts)
    assert attempts[-1].prediction["status"] == "succeeded"


def field_violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    found: list[str] = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [v.field for v in bad.field_violations]
    return found


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://10.1.2.3/hook", "http://[::1]/hook"]
)
def test_a_private_webhook_is_refused_unless_allowed(
    url: str, strict_predictions: str, gateway_service: GatewayService
) -> None:
    with grpc.insecure_channel(strict_predictions) as channel:
        stub = predictions_pb2_grpc.PredictionServiceStub(channel)
        model = served_model(gateway_service)
        request = predictions_pb2.CreatePredictionRequest(model=model, webhook=url)
        json_format.ParseDict({"prompt": "Hi", "parameters": {"max_new_tokens": 2}}, request.input)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreatePrediction(request, metadata=gateway_service.metadata("user"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert field_violations(caught.value) == ["webhook"], caught.value


def served_model(gateway_service: GatewayService) -> str:
    with grpc.insecure_channel(gateway_service.address) as channel:
        served = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
            info_pb2.ListServedModelsRequest(), metadata=gateway_service.metadata("user"), timeout=30
        )
    return next(m.id for m in served.models if m.task == "generation")


@pytest.fixture(scope="module")
def strict_predictions(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A predictions service (SQLite, no Envoy) that refuses private webhook addresses."""
    folder: Path = tmp_path_factory.mktemp("predictions-strict")
    service = start_predictions(
        gateway_service,
        sqlite_url(folder),
        "predictions-strict",
        args=(*FAST_FLAGS, "--allow-private-webhooks", "false"),
    )
    yield service.address
    service.stop()
