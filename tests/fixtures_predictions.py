"""Session fixtures for the predictions tier: `python -m services.predictions` as a real process
against the session gateway, each with its own Envoy in front.

`predictions_sqlite` stores in a temporary SQLite file, `predictions_postgres` in a fresh
database on the session PostgreSQL server (tests/fixtures_postgres.py), and
`predictions_stack` is parametrized over both, so that a test that takes it runs against each.
`start_predictions` starts one more replica (the crash test runs two on one database).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_gateway import EnvoyService, GatewayService, descriptor_for_envoy, start_envoy
from tests.fixtures_postgres import PostgresServer
from tests.stack import ServiceProcess, free_port

# Short leases, polls and webhook backoffs (retried for up to two minutes, at most 1 s apart),
# so that takeovers and retries happen within a test.
FAST_FLAGS: tuple[str, ...] = (
    "--lease-seconds",
    "4",
    "--poll-seconds",
    "0.2",
    "--webhook-retry-seconds",
    "120",
    "--webhook-max-backoff-seconds",
    "1",
)


@dataclass
class PredictionsService:
    """A running predictions replica."""

    name: str
    address: str
    metrics_port: int
    database_url: str
    process: ServiceProcess

    def stop(self, grace: float = 15.0) -> int | None:
        return self.process.stop(grace)


def start_predictions(
    gateway_service: GatewayService,
    database_url: str,
    name: str = "predictions",
    extra_env: Mapping[str, str] | None = None,
    *,
    args: Sequence[str] = FAST_FLAGS,
    public_url: str = "",
    port: int | None = None,
    timeout: float = 120.0,
) -> PredictionsService:
    """Starts `python -m services.predictions` on free ports (or `port`), calling the gateway
    with its key file, and waits until it serves gRPC health."""
    port = port or free_port()
    metrics_port = free_port()
    process = ServiceProcess.python_module(
        name,
        "services.predictions",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--database-url",
        database_url,
        "--gateway-address",
        gateway_service.address,
        "--public-url",
        public_url or f"http://127.0.0.1:{port}",
        "--api-keys-file",
        str(gateway_service.keys_file),
        "--allow-private-webhooks",
        "true",
        *args,
        env=dict(extra_env or {}),
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        process.wait_until_serving(address, timeout=timeout)
    except BaseException:
        process.stop(grace=5)
        raise
    return PredictionsService(name, address, metrics_port, database_url, process)


def sqlite_url(folder: Path) -> str:
    return f"sqlite+aiosqlite:///{folder / 'predictions.db'}"


@dataclass
class PredictionsStack:
    """A predictions service on one backend ("sqlite" or "postgres") with its own Envoy."""

    backend: str
    service: PredictionsService
    envoy: EnvoyService
    gateway: GatewayService

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def grpc_address(self) -> str:
        """Envoy's listener, for native gRPC (it routes PredictionService to the service)."""
        return self.envoy.url.removeprefix("http://")

    def headers(self, key: str = "user", **more: str) -> dict[str, str]:
        return {**self.gateway.headers(key), **more}

    def metadata(self, key: str = "user") -> tuple[tuple[str, str], ...]:
        return self.gateway.metadata(key)

    def request(
        self,
        method: str,
        path: str,
        body: Any | None = None,
        key: str | None = "user",
        headers: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], Any]:
        """One REST call through Envoy: (status, lower-case headers, parsed JSON body or text)."""
        sent = {**(self.gateway.headers(key) if key else {}), **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["content-type"] = "application/json"
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                status, got, raw = reply.status, dict(reply.headers.items()), reply.read()
        except urllib.error.HTTPError as error:
            status, got, raw = error.code, dict(error.headers.items()), error.read()
        text = raw.decode(errors="replace")
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return status, {k.lower(): v for k, v in got.items()}, parsed

    def create(self, body: dict[str, Any], key: str = "user", wait: int | None = None) -> dict[str, Any]:
        """POST /v1/predictions that must answer 201; the prediction."""
        headers = {"prefer": f"wait={wait}"} if wait is not None else None
        status, _, reply = self.request("POST", "/v1/predictions", body, key, headers)
        assert status == 201, f"{status}: {reply}"
        assert isinstance(reply, dict)
        return reply

    def get(self, prediction_id: str, key: str = "user") -> dict[str, Any]:
        status, _, reply = self.request("GET", f"/v1/predictions/{prediction_id}", key=key)
        assert status == 200, f"{status}: {reply}"
        assert isinstance(reply, dict)
        return reply

    def wait_until_done(
        self, prediction_id: str, key: str = "user", timeout: float = 180.0
    ) -> dict[str, Any]:
        """Polls until the prediction reaches a terminal status."""
        deadline = time.monotonic() + timeout
        while True:
            prediction = self.get(prediction_id, key)
            if prediction["status"] in ("succeeded", "failed", "canceled"):
                return prediction
            assert time.monotonic() < deadline, f"still {prediction['status']}: {prediction}"
            time.sleep(0.2)


def start_stack(
    backend: str,
    gateway_service: GatewayService,
    database_url: str,
    workdir: Path,
    args: Sequence[str] = FAST_FLAGS,
    name: str = "predictions",
) -> PredictionsStack:
    """A predictions service and an Envoy routing to it (and to the session gateway)."""
    port = free_port()
    envoy = start_envoy(
        gateway_service.address,
        workdir,
        name=f"envoy-{name}",
        descriptor=descriptor_for_envoy(),
        predictions_address=f"127.0.0.1:{port}",
    )
    try:
        service = start_predictions(
            gateway_service, database_url, name, args=args, public_url=envoy.url, port=port
        )
    except BaseException:
        envoy.process.stop()
        raise
    return PredictionsStack(backend, service, envoy, gateway_service)


def stop_stack(stack: PredictionsStack) -> None:
    stack.service.stop()
    stack.envoy.process.stop()


@pytest.fixture(scope="session")
def predictions_sqlite(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictionsStack]:
    folder = tmp_path_factory.mktemp("predictions-sqlite")
    stack = start_stack("sqlite", gateway_service, sqlite_url(folder), folder, name="predictions-sqlite")
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="session")
def predictions_postgres(
    gateway_service: GatewayService,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PredictionsStack]:
    folder = tmp_path_factory.mktemp("predictions-postgres")
    database = postgres_server.create_database("predictions")
    stack = start_stack("postgres", gateway_service, database, folder, name="predictions-postgres")
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def predictions_stack(request: pytest.FixtureRequest) -> PredictionsStack:
    """Each test that takes it runs once on SQLite and once on PostgreSQL."""
    stack: PredictionsStack = request.getfixturevalue(f"predictions_{request.param}")
    return stack
