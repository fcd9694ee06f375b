"""Unknown JSON fields are refused at the edge (real Envoy, gateway and backends): every transcoded
body route, found in the descriptor so that new routes are covered, answers a misspelled field with
a 400 naming it; nested paths are named; valid bodies, proto and json names, and strings that look
like keys still pass."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.fixtures_gateway import DESCRIPTOR, GatewayService
from tests.stack import ROOT, ServiceProcess, free_port
from tools.envoy_config import render_module

ROUTES = render_module().field_tables(DESCRIPTOR.read_bytes())[0] if DESCRIPTOR.exists() else []


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("admin"), timeout=120) as client:
        yield client


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]*\}", "some-model", template)


def assert_unknown_field(response: httpx2.Response, path: str, field: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    if path.startswith("/v1/"):
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "unknown_parameter"
        assert error["param"] == field
        message = error["message"]
    else:
        assert body["code"] == 3
        (detail,) = body["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert detail["field_violations"][0]["field"] == field
        message = body["message"]
    assert f'unknown field "{field}"' in message and "accepts: " in message
    return body


def test_the_descriptor_has_native_and_openai_body_routes() -> None:
    templates = {route.template for route in ROUTES}
    assert {"/generate", "/chat", "/embeddings", "/v1/chat/completions", "/v1/embeddings"} <= templates


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route.method} {route.template}")
def test_a_misspelled_field_is_refused_on_every_body_route(rest: httpx2.Client, route: Any) -> None:
    path = concrete(route.template)
    response = rest.request(route.method, path, json={"modle": "x"})
    body = assert_unknown_field(response, path, "modle")
    text = json.dumps(body)
    assert route.message.rsplit(".", 1)[1] in text


def test_the_message_lists_what_the_route_accepts(rest: httpx2.Client) -> None:
    body = rest.post("/generate", json={"prompt": "hi", "temperatur": 0.5}).json()
    assert body["message"].startswith(
        'unknown field "temperatur" in GenerateRequest; GenerateRequest accepts: prompt, messages, model,'
    )


def test_a_flat_sampling_knob_on_a_native_route_hints_at_parameters(rest: httpx2.Client) -> None:
    body = assert_unknown_field(
        rest.post("/generate", json={"prompt": "hi", "temperature": 0}), "/generate", "temperature"
    )
    assert '"temperature" belongs under "parameters"' in body["message"]


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/generate", {"prompt": "hi", "parameters": {"temperatur": 1}}, "parameters.temperatur"),
        ("/chat", {"messages": [{"role": "user", "content": "hi"}, {"rol": "user"}]}, "messages[1].rol"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "contnet": "hi"}]},
            "messages[0].contnet",
        ),
    ],
)
def test_nested_unknown_fields_name_their_path(
    rest: httpx2.Client, path: str, payload: dict[str, Any], field: str
) -> None:
    assert_unknown_field(rest.post(path, json=payload), path, field)


def test_proto_and_json_names_and_key_like_strings_pass(rest: httpx2.Client) -> None:
    tricky = 'say "temperatur": 1, {"modle": [2]} and \\"escaped\\" quotes \u00e9'
    for parameters in ({"max_new_tokens": 2, "temperature": 0}, {"maxNewTokens": 2, "topK": 1}):
        response = rest.post("/generate", json={"prompt": tricky, "parameters": parameters})
        assert response.status_code == 200, response.text
        assert response.json()["tokens_generated"] >= 1
    # Escaped key names are read as the transcoder reads them.
    raw = '{"prompt": "hi", "param\\u0065ters": {"max_new_tokens": 1}}'
    response = rest.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_a_body_with_every_field_still_works(rest: httpx2.Client) -> None:
    models = rest.get("/models").json()["models"]
    chat_model = next(model["id"] for model in models if model["task"] == "generation")
    payload = {
        "model": chat_model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "temperature": 0,
        "top_p": 1,
        "n": 1,
        "stop": ["\n\n"],
        "seed": 1,
        "user": "test",
        "stream": False,
    }
    response = rest.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text


def test_a_large_batch_is_scanned_to_its_end(rest: httpx2.Client) -> None:
    inputs = [f'text {i} with "quotes", {{"braces": [1]}} and \\ slashes' for i in range(20000)]
    response = rest.post("/v1/embeddings", json={"model": "m", "input": inputs, "dimenions": 8})
    assert_unknown_field(response, "/v1/embeddings", "dimenions")


def test_an_unrendered_template_refuses_bodies_loudly(
    gateway_service: GatewayService, tmp_path: Path
) -> None:
    """envoy/envoy.yaml as checked in, only its ports and paths changed: no field table, so no
    body passes unchecked, and the reply says what to run."""
    port, admin = free_port(), free_port()
    host, gateway_port = gateway_service.address.rsplit(":", 1)
    text = (
        (ROOT / "envoy" / "envoy.yaml")
        .read_text()
        .replace("port_value: 8080}", f"port_value: {port}}}")
        .replace("port_value: 9901}", f"port_value: {admin}}}")
        .replace("port_value: 50051}", f"port_value: {gateway_port}}}")
        .replace("proto_descriptor: build/inference.pb", f"proto_descriptor: {DESCRIPTOR}")
    )
    assert "local strict = nil" in text and host == "127.0.0.1"
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    envoy = shutil.which("envoy") or str(ROOT / ".venv" / "bin" / "envoy")
    process = ServiceProcess("envoy-unrendered", [envoy, "-c", str(config), "--base-id", str(port)]).start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert process.alive() and time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        response = httpx2.post(f"{url}/generate", json={"prompt": "hi"}, timeout=30)
        assert response.status_code == 500 and "not rendered" in response.json()["message"]
        response = httpx2.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    finally:
        process.stop()
