"""The gateway's policy on a real stack: API keys and scopes, per-key rate limits, the
response cache, Prometheus metrics, traces continued from a client's traceparent, and a
catalogue of bad requests that each get a 4xx with a message while the stack keeps serving."""

from __future__ import annotations

import secrets
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx2
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from inference.v1 import openai_pb2, openai_pb2_grpc

from tests.fixtures_gateway import GatewayService, OtlpCollector, SpanRecord

CHAT = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def rest(envoy_url: str) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, timeout=120) as client:
        yield client


def bearer(gateway_service: GatewayService, name: str) -> dict[str, str]:
    return gateway_service.headers(name)


def message_of(reply: httpx2.Response) -> str:
    """The error's message: OpenAI's {"error": {...}} on /v1/*, google.rpc.Status elsewhere."""
    body = reply.json()
    return str(body["error"]["message"] if "error" in body else body["message"])


# --- auth -----------------------------------------------------------------------------------


def test_a_missing_key_gets_401_with_a_message(rest: httpx2.Client) -> None:
    reply = rest.get("/v1/models")
    assert reply.status_code == 401
    assert "missing API key" in message_of(reply)


def test_an_unknown_key_gets_401(rest: httpx2.Client) -> None:
    reply = rest.get("/v1/models", headers={"authorization": "Bearer sk-not-a-key"})
    assert reply.status_code == 401 and "invalid API key" in message_of(reply)


def test_a_revoked_key_gets_401(rest: httpx2.Client, gateway_service: GatewayService) -> None:
    reply = rest.get("/v1/models", headers=bearer(gateway_service, "revoked"))
    assert reply.status_code == 401 and "revoked" in message_of(reply)


def test_a_key_without_the_scope_gets_403(rest: httpx2.Client, gateway_service: GatewayService) -> None:
    reply = rest.post("/generate", json={"prompt": "hi"}, headers=bearer(gateway_service, "embed-only"))
    assert reply.status_code == 403
    assert "generate" in message_of(reply)
    reply = rest.post("/embeddings/preload", json={"models": []}, headers=bearer(gateway_service, "user"))
    assert reply.status_code == 403 and "admin" in message_of(reply)


def test_x_api_key_is_accepted_like_bearer(rest: httpx2.Client, gateway_service: GatewayService) -> None:
    reply = rest.get("/v1/models", headers={"x-api-key": gateway_service.keys["embed-only"]})
    assert reply.status_code == 200 and reply.json()["object"] == "list"


def test_grpc_clients_authenticate_with_metadata(gateway_service: GatewayService) -> None:
    with grpc.insecure_channel(gateway_service.address) as channel:
        stub = openai_pb2_grpc.OpenAIServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(openai_pb2.ListModelsRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.ListModels(
            openai_pb2.ListModelsRequest(), timeout=30, metadata=gateway_service.metadata()
        )
        assert reply.object == "list" and len(reply.data) >= 2


# --- rate limits ----------------------------------------------------------------------------


def test_a_burst_beyond_the_limit_gets_429_with_a_retry_hint_and_the_next_window_passes(
    rest: httpx2.Client, gateway_service: GatewayService
) -> None:
    headers = bearer(gateway_service, "limited")  # 60 per minute, burst 3
    codes = [rest.get("/v1/models", headers=headers).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429
    refused = rest.get("/v1/models", headers=headers)
    assert refused.status_code == 429
    assert "requests per minute" in message_of(refused)
    # Over REST the hint is Retry-After, whole seconds rounded up from RetryInfo.
    delay = float(refused.headers["retry-after"])
    assert 1 <= delay <= 2
    time.sleep(delay + 0.05)
    assert rest.get("/v1/models", headers=headers).status_code == 200


def test_grpc_clients_get_resource_exhausted_with_retry_info(gateway_service: GatewayService) -> None:
    metadata = gateway_service.metadata("limited")
    with grpc.insecure_channel(gateway_service.address) as channel:
        stub = openai_pb2_grpc.OpenAIServiceStub(channel)
        error: grpc.RpcError | None = None
        for _ in range(6):
            try:
                stub.ListModels(openai_pb2.ListModelsRequest(), timeout=30, metadata=metadata)
            except grpc.RpcError as raised:
                error = raised
                break
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    kinds = {detail.type_url.rsplit(".", 1)[-1] for detail in status.details}
    assert "RetryInfo" in kinds
    retry = error_details_pb2.RetryInfo()
    next(detail for detail in status.details if detail.Is(retry.DESCRIPTOR)).Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() > 0


def test_token_limits_refuse_a_key_once_its_tokens_are_spent(
    rest: httpx2.Client, gateway_service: GatewayService
) -> None:
    headers = bearer(gateway_service, "token-limited")  # 30 tokens per minute
    body = {"input": ["a fairly long sentence to embed, with enough words to count " * 3]}
    first = rest.post("/embeddings", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["total_tokens"] > 30
    refused = rest.post("/embeddings", json=body, headers=headers)
    assert refused.status_code == 429 and "tokens per minute" in message_of(refused)


# --- cache and metrics ----------------------------------------------------------------------


def metric(gateway_service: GatewayService, name: str, **labels: str) -> float:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{gateway_service.metrics_port}/metrics", timeout=10
    ) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_deterministic_requests_are_answered_from_the_cache(
    rest: httpx2.Client, gateway_service: GatewayService
) -> None:
    headers = bearer(gateway_service, "user")
    request = {
        "prompt": f"Count: {secrets.token_hex(4)}",
        "parameters": {"max_new_tokens": 3, "do_sample": False},
    }
    hits = metric(gateway_service, "gateway_cache_hits_total", method="Generate")
    first = rest.post("/generate", json=request, headers=headers)
    started = time.perf_counter()
    second = rest.post("/generate", json=request, headers=headers)
    cached_seconds = time.perf_counter() - started
    assert first.status_code == second.status_code == 200
    assert second.json()["generated_text"] == first.json()["generated_text"]
    assert metric(gateway_service, "gateway_cache_hits_total", method="Generate") == hits + 1
    # The cached answer is a request of its own, with an id of its own.
    assert second.json()["request_id"].startswith("cached-"), second.json()["request_id"]
    assert second.json()["request_id"] != first.json()["request_id"]
    assert cached_seconds < 1.0
    sampled = {**request, "parameters": {"max_new_tokens": 3, "do_sample": True, "temperature": 0.8}}
    rest.post("/generate", json=sampled, headers=headers)
    rest.post("/generate", json=sampled, headers=headers)
    assert metric(gateway_service, "gateway_cache_hits_total", method="Generate") == hits + 1


def test_metrics_count_requests_by_method_key_and_status(
    rest: httpx2.Client, gateway_service: GatewayService
) -> None:
    method = "/inference.v1.OpenAIService/ListModels"
    before = metric(gateway_service, "gateway_requests_total", method=method, key="user", code="OK")
    assert rest.get("/v1/models", headers=bearer(gateway_service, "user")).status_code == 200
    assert (
        metric(gateway_service, "gateway_requests_total", method=method, key="user", code="OK") == before + 1
    )
    assert metric(gateway_service, "gateway_request_duration_seconds_count", method=method) > 0
    assert metric(gateway_service, "gateway_rate_limit_rejections_total", key="limited") >= 1


# --- traces ---------------------------------------------------------------------------------


def test_a_client_traceparent_is_continued_by_the_gateway_and_passed_to_the_backend(
    rest: httpx2.Client, gateway_service: GatewayService, otlp_collector: OtlpCollector
) -> None:
    trace_id = uuid.uuid4().hex
    parent = secrets.token_hex(8)
    headers = {**bearer(gateway_service, "user"), "traceparent": f"00-{trace_id}-{parent}-01"}
    reply = rest.post(
        "/generate",
        json={"prompt": f"Trace {trace_id}", "parameters": {"max_new_tokens": 2}},
        headers=headers,
    )
    assert reply.status_code == 200, reply.text

    def complete(spans: list[SpanRecord]) -> bool:
        mine = [span for span in spans if span.trace_id == trace_id]
        return {span.kind for span in mine} >= {2, 3}  # SERVER and CLIENT

    spans = [span for span in otlp_collector.wait_for(complete) if span.trace_id == trace_id]
    server = [span for span in spans if span.kind == 2 and span.service == "gateway"]
    client = [span for span in spans if span.kind == 3 and span.service == "gateway"]
    assert server and server[0].parent_span_id == parent, spans
    assert server[0].name == "/inference.v1.GenerationService/Generate"
    assert client and client[0].parent_span_id == server[0].span_id, spans


# --- bad requests ---------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, Any, int]] = [
    ("POST", "/generate", '{"prompt": "unterminated', 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"max_new_tokens": "many"}}, 400),
    ("POST", "/generate", {"prompt": ["not", "a", "string"]}, 400),
    ("POST", "/generate", {"prompt": ""}, 400),
    ("POST", "/generate", {"prompt": "x" * 100_001}, 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"max_new_tokens": 0}}, 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"max_new_tokens": 1_000_000}}, 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"temperature": -1}}, 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"top_p": 1.5}}, 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"num_return_sequences": 99}}, 400),
    ("POST", "/generate", {"prompt": "x", "parameters": {"stop": [1, 2]}}, 400),
    ("POST", "/generate", {"prompt": "x", "model": "no-such-model"}, 404),
    ("POST", "/generate", {"prompt": "x", "stream": True, "parameters": {"temperature": 1e9}}, 400),
    ("POST", "/chat", {"messages": []}, 400),
    ("POST", "/chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("POST", "/solve/math", {"problem": ""}, 400),
    ("POST", "/embeddings", {"input": []}, 400),
    ("POST", "/embeddings", {"input": [""]}, 400),
    ("POST", "/embeddings", {"input": "hi", "dimensions": 0}, 400),
    ("POST", "/embeddings", {"input": {"a": 1}}, 400),
    ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": CHAT}, 404),
    ("POST", "/v1/chat/completions", {"messages": CHAT}, 400),
    ("POST", "/v1/chat/completions", {"model": "x", "messages": CHAT, "temperature": 3}, 400),
    ("POST", "/v1/chat/completions", {"model": "x", "messages": CHAT, "n": 0}, 400),
    ("POST", "/v1/chat/completions", {"model": "x", "messages": "hi"}, 400),
    ("POST", "/v1/chat/completions", {"model": "x", "messages": CHAT, "stream": True, "top_p": 0}, 400),
    ("POST", "/v1/completions", {"model": "x", "prompt": [1, 2, 3]}, 400),
    ("POST", "/v1/embeddings", {"model": "x", "input": "hi", "encoding_format": "hex"}, 400),
    ("GET", "/v1/models/no-such-model", None, 404),
    ("GET", "/embeddings/cache/status?x=1", None, 400),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(
    rest: httpx2.Client, gateway_service: GatewayService, method: str, path: str, body: Any, status: int
) -> None:
    headers = {**bearer(gateway_service, "admin"), "content-type": "application/json"}
    if isinstance(body, str):
        reply = rest.request(method, path, content=body, headers=headers)
    elif body is None:
        reply = rest.request(method, path, headers=headers)
    else:
        reply = rest.request(method, path, json=body, headers=headers)
    assert reply.status_code == status, reply.text
    # Every 4xx is JSON, Envoy's own refusals included: OpenAI's shape on /v1/*, else a Status.
    assert reply.headers["content-type"] == "application/json", reply.text
    assert message_of(reply)
    if path.startswith("/v1/"):
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    else:
        assert isinstance(reply.json()["code"], int)


def test_the_stack_keeps_serving_after_the_bad_requests(
    rest: httpx2.Client, gateway_service: GatewayService
) -> None:
    health = rest.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "SERVING_STATUS_SERVING"
    reply = rest.post(
        "/generate",
        json={"prompt": "Hello", "parameters": {"max_new_tokens": 2}},
        headers=bearer(gateway_service, "user"),
    )
    assert reply.status_code == 200
