"""Error shapes over REST (real Envoy, gateway and backends): OpenAI's {"error": {...}} on /v1/*
as the openai SDK reads it, google.rpc.Status on native routes, Retry-After on 429 and 503, and
Envoy's own refusals (bad JSON, wrong types, bad UTF-8, unknown routes, 413, 426) as JSON too."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fixtures_gateway import EnvoyService, GatewayService, descriptor_for_envoy, start_envoy
from tests.stack import free_port

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def sdk(openai_sdk: OpenAI) -> OpenAI:
    return openai_sdk


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("user"), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def chat_model(rest: httpx2.Client) -> str:
    models = rest.get("/models").json()["models"]
    return str(next(model["id"] for model in models if model["task"] == "generation"))


def sdk_error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_a_bad_value_names_the_openai_field(sdk: OpenAI, chat_model: str) -> None:
    error = sdk_error(lambda: sdk.chat.completions.create(model=chat_model, messages=USER, temperature=5))
    assert isinstance(error, openai.BadRequestError)
    assert (error.status_code, error.type, error.param, error.code) == (
        400,
        "invalid_request_error",
        "temperature",
        None,
    )
    assert "must be in [0, 2]" in error.message


def test_a_value_of_the_wrong_type_names_the_field(sdk: OpenAI, chat_model: str) -> None:
    error = sdk_error(
        lambda: sdk.chat.completions.create(
            model=chat_model, messages=USER, extra_body={"temperature": "hot"}
        )
    )
    assert (error.status_code, error.type, error.param) == (400, "invalid_request_error", "temperature")


def test_an_unknown_parameter_is_refused(sdk: OpenAI, chat_model: str) -> None:
    error = sdk_error(
        lambda: sdk.chat.completions.create(model=chat_model, messages=USER, extra_body={"temperatur": 0})
    )
    assert (error.status_code, error.type, error.param, error.code) == (
        400,
        "invalid_request_error",
        "temperatur",
        "unknown_parameter",
    )
    assert "accepts: model, messages, max_tokens" in error.message


def test_an_unknown_model_is_not_found(sdk: OpenAI) -> None:
    error = sdk_error(lambda: sdk.models.retrieve("no-such-model"))
    assert isinstance(error, openai.NotFoundError)
    assert (error.status_code, error.type, error.code) == (404, "not_found_error", "model_not_found")
    error = sdk_error(lambda: sdk.chat.completions.create(model="no-such-model", messages=USER))
    assert (error.status_code, error.type, error.code) == (404, "not_found_error", "model_not_found")


def test_a_bad_key_is_an_authentication_error(envoy_url: str) -> None:
    with OpenAI(base_url=f"{envoy_url}/v1", api_key="sk-wrong", max_retries=0) as client:
        error = sdk_error(client.models.list)
    assert isinstance(error, openai.AuthenticationError)
    assert (error.status_code, error.type, error.code) == (401, "authentication_error", "invalid_api_key")


def test_a_missing_scope_is_a_permission_error(envoy_url: str, gateway_service: GatewayService) -> None:
    with OpenAI(
        base_url=f"{envoy_url}/v1", api_key=gateway_service.keys["embed-only"], max_retries=0
    ) as client:
        error = sdk_error(lambda: client.chat.completions.create(model="m", messages=USER))
    assert isinstance(error, openai.PermissionDeniedError)
    assert (error.status_code, error.type, error.code) == (403, "permission_error", "missing_scope")


def test_a_rate_limit_is_429_with_retry_after(envoy_url: str, gateway_service: GatewayService) -> None:
    with OpenAI(base_url=f"{envoy_url}/v1", api_key=gateway_service.keys["limited"], max_retries=0) as client:
        for _ in range(10):
            try:
                client.models.list()
            except openai.RateLimitError as error:
                assert (error.status_code, error.type, error.code) == (
                    429,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                )
                assert int(error.response.headers["retry-after"]) >= 1
                break
        else:
            pytest.fail("the limited key was never limited")
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("limited")) as native:
        for _ in range(10):
            response = native.get("/models")
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["code"] == 8
                break
        else:
            pytest.fail("the limited key was never limited on the native route")


def test_native_routes_keep_google_rpc_status(rest: httpx2.Client) -> None:
    response = rest.post("/generate", json={"prompt": "hi", "parameters": {"temperature": -1}})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3 and "error" not in body
    assert body["details"][0]["field_violations"][0]["field"] == "parameters.temperature"


# Envoy's own refusals: name, (native path, body), (/v1 path, body), status, text in the message.
BIG = (
    b'{"input": ['
    + b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",' * (17 * 2**14)
    + b'"x"]}'
)
REFUSALS = [
    (
        "malformed JSON",
        ("/generate", b'{"prompt": "hi",'),
        ("/v1/chat/completions", b'{"model": "m",'),
        400,
        "Unexpected",
    ),
    (
        "wrong type",
        ("/generate", b'{"prompt": 1}'),
        ("/v1/embeddings", b'{"model": 2, "input": "x"}'),
        400,
        "invalid value",
    ),
    (
        "invalid UTF-8",
        ("/generate", b'{"prompt": "\xff\xfe"}'),
        ("/v1/completions", b'{"prompt": "\xff"}'),
        400,
        "UTF-8",
    ),
    (
        "max_new_tokens 1e12",
        ("/generate", b'{"prompt": "hi", "parameters": {"max_new_tokens": 1e12}}'),
        ("/v1/completions", b'{"model": "m", "prompt": "hi", "max_tokens": 1e12}'),
        400,
        "invalid value",
    ),
    ("unknown route", ("/no/such/route", b"{}"), ("/v1/no/such/route", b"{}"), 404, "Could not resolve"),
    ("body too large", ("/embeddings", BIG), ("/v1/embeddings", BIG), 413, "16 MiB"),
]


@pytest.mark.parametrize("openai_route", [False, True], ids=["native", "openai"])
@pytest.mark.parametrize(
    ("native", "v1", "status", "text"),
    [refusal[1:] for refusal in REFUSALS],
    ids=[refusal[0] for refusal in REFUSALS],
)
def test_envoy_refusals_are_json(
    rest: httpx2.Client,
    openai_route: bool,
    native: tuple[str, bytes],
    v1: tuple[str, bytes],
    status: int,
    text: str,
) -> None:
    path, body = v1 if openai_route else native
    response = rest.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert_error_shape(response.json(), openai_route, status, text)


def assert_error_shape(body: dict[str, Any], openai_route: bool, status: int, text: str) -> None:
    if openai_route:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        expected = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
        assert error["type"] == expected.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        assert text in error["message"] and "\n" not in error["message"]
    else:
        assert isinstance(body["code"], int) and body["code"] != 0
        assert text in body["message"] and "\n" not in body["message"]


def test_the_wrong_type_names_the_field_on_openai_routes(rest: httpx2.Client) -> None:
    response = rest.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1e12})
    assert response.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_http_1_0_gets_426_as_json(envoy_url: str, path: str) -> None:
    address = urlsplit(envoy_url)
    with socket.create_connection((address.hostname or "", address.port or 80), timeout=10) as conn:
        head = f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        conn.sendall(head.encode() + b"{}")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    status, _, payload = reply.partition(b"\r\n\r\n")
    assert status.split(b" ", 2)[1] == b"426", status
    assert b"content-type: application/json" in status.lower()
    assert_error_shape(json.loads(payload), path.startswith("/v1/"), 426, "HTTP/1.0")


@pytest.fixture(scope="module")
def envoy_without_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyService]:
    # Nothing listens on this port: the router answers 503.
    service = start_envoy(
        f"127.0.0.1:{free_port()}",
        Path(tmp_path_factory.mktemp("envoy-503")),
        descriptor=descriptor_for_envoy(),
    )
    yield service
    service.process.stop()


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_an_unreachable_gateway_is_503_with_retry_after(
    envoy_without_gateway: EnvoyService, path: str
) -> None:
    response = httpx2.post(f"{envoy_without_gateway.url}{path}", json={"prompt": "hi"}, timeout=30)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    body = response.json()
    if path.startswith("/v1/"):
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "service_unavailable"
    else:
        assert body["code"] == 14
