"""CORS at the edge (real Envoy in front of the real gateway): Envoy answers preflights from the
configured origins, refuses others, adds the headers to real responses, and none of it happens
without ENVOY_CORS_ORIGINS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.fixtures_gateway import EnvoyService, GatewayService, descriptor_for_envoy, start_envoy

PLAYGROUND = "http://localhost:8501"
ORIGINS = f"{PLAYGROUND}, https://app.example.com"


@pytest.fixture(scope="module")
def cors_envoy(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyService]:
    service = start_envoy(
        gateway_service.address,
        Path(tmp_path_factory.mktemp("envoy-cors")),
        name="envoy-cors",
        descriptor=descriptor_for_envoy(),
        cors_origins=ORIGINS,
    )
    yield service
    service.process.stop()


def preflight(url: str, origin: str, path: str = "/v1/chat/completions") -> httpx2.Response:
    return httpx2.options(
        f"{url}{path}",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        },
        timeout=30,
    )


@pytest.mark.parametrize("origin", [PLAYGROUND, "https://app.example.com"])
def test_envoy_answers_a_preflight_from_an_allowed_origin(cors_envoy: EnvoyService, origin: str) -> None:
    response = preflight(cors_envoy.url, origin)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == origin
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = {name.strip() for name in response.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization", "x-api-key"} <= allowed
    # Answered by Envoy: the gateway never saw it (it has no OPTIONS route).
    assert "x-envoy-upstream-service-time" not in response.headers


def test_a_preflight_from_another_origin_gets_no_cors_headers(cors_envoy: EnvoyService) -> None:
    response = preflight(cors_envoy.url, "https://evil.example.org")
    assert "access-control-allow-origin" not in response.headers


def test_a_real_request_from_an_allowed_origin_carries_cors_headers(
    cors_envoy: EnvoyService, gateway_service: GatewayService
) -> None:
    response = httpx2.post(
        f"{cors_envoy.url}/embeddings",
        json={"input": ["hello"]},
        headers={"origin": PLAYGROUND, **gateway_service.headers()},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == PLAYGROUND
    assert "retry-after" in response.headers["access-control-expose-headers"]


def test_without_origins_there_is_no_cors(envoy_url: str) -> None:
    response = preflight(envoy_url, PLAYGROUND)
    assert "access-control-allow-origin" not in response.headers
