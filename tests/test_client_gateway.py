"""The client's API key reaches the real gateway as `authorization: Bearer <key>`, and the
gateway's refusals arrive as typed errors with their google.rpc details (ErrorInfo, RetryInfo)."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator

import grpc
import pytest
from inference_client import (
    AsyncInferenceClient,
    InferenceClient,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)

from tests.fixtures_gateway import GatewayService, start_gateway

TIMEOUT = 60.0


def connect(gateway: GatewayService, api_key: str) -> InferenceClient:
    return InferenceClient(gateway.address, api_key=api_key, timeout=TIMEOUT)


def test_api_key_is_accepted_by_the_gateway(gateway_service: GatewayService) -> None:
    with InferenceClient(
        gateway_service.address, api_key=gateway_service.keys["user"], timeout=TIMEOUT
    ) as client:
        result = client.embed("through the gateway")

    assert len(result.vectors) == 1 and result.dimensions > 0


def test_wrong_api_key_raises_unauthenticated_with_error_info(gateway_service: GatewayService) -> None:
    with connect(gateway_service, "sk-wrong") as client, pytest.raises(UnauthenticatedError) as caught:
        client.embed("refused")

    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.error_info is not None
    assert caught.value.error_info.domain == "inference.gateway"


def test_stats_and_cache_status_through_the_gateway(gateway_service: GatewayService) -> None:
    with connect(gateway_service, gateway_service.keys["user"]) as client:
        client.embed("counted by the embedder")
        stats = client.stats()
        cache = client.cache_status()

    assert stats[0].component == "gateway" and stats[0].requests_total >= 1
    embedder = next(item for item in stats if item.component == "embedder")
    assert embedder.embedded_inputs_total >= 1 and embedder.uptime_seconds > 0
    assert any(item.component == "generator" for item in stats)
    assert cache.strategy in {"fixed_size", "memory_aware"}
    assert cache.models and all(model.dimensions > 0 and model.loaded_at > 0 for model in cache.models)


async def test_async_stats_and_cache_status_match_the_sync_client(gateway_service: GatewayService) -> None:
    key = gateway_service.keys["user"]
    async with AsyncInferenceClient(gateway_service.address, api_key=key, timeout=TIMEOUT) as client:
        stats = await client.stats()
        cache = await client.cache_status()
    with connect(gateway_service, key) as sync_client:
        expected = sync_client.cache_status()

    assert stats[0].component == "gateway" and {"generator", "embedder"} <= {item.component for item in stats}
    assert [model.name for model in cache.models] == [model.name for model in expected.models]


def test_key_without_the_scope_raises_permission_denied(gateway_service: GatewayService) -> None:
    key = gateway_service.keys["embed-only"]
    with connect(gateway_service, key) as client, pytest.raises(PermissionDeniedError) as caught:
        client.generate("not allowed", max_new_tokens=2)

    info = caught.value.error_info
    assert info is not None and info.metadata["scope"] == "generate"


@pytest.fixture(scope="module")
def rate_limited_gateway(
    generator_address: str, embedder_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A gateway of its own whose one key may make a single request per minute, so that the
    session's shared keys keep their budgets."""
    key = f"sk-client-{secrets.token_hex(8)}"
    keys_file = tmp_path_factory.mktemp("client-keys") / "keys.json"
    entry = {
        "name": "one-per-minute",
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "scopes": ["generate", "embed"],
        "requests_per_minute": 1,
        "burst": 1,
    }
    keys_file.write_text(json.dumps({"keys": [entry]}))
    process, address, _ = start_gateway(
        generator_address, embedder_address, ("--api-keys-file", str(keys_file)), name="client-gateway"
    )
    yield address, key
    process.stop()


def test_rate_limit_raises_resource_exhausted_with_retry_delay(rate_limited_gateway: tuple[str, str]) -> None:
    address, key = rate_limited_gateway
    with InferenceClient(address, api_key=key, timeout=TIMEOUT) as client:
        client.embed("first is allowed")
        with pytest.raises(ResourceExhaustedError) as caught:
            client.embed("second is over the limit")

    error = caught.value
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_delay is not None and 0 < error.retry_delay <= 60
