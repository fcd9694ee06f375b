"""Session fixtures for the gateway tier (real process over loopback) and Envoy in front of it.

`gateway_service` runs `python -m services.gateway` on free ports against the generator and
embedder fixtures, with an API-key file made for the tests (`gateway_service.keys` holds the
plain keys by name) and traces exported to an OTLP receiver in this process (`otlp_collector`).
`envoy_url` is Envoy, rendered from envoy/envoy.yaml onto free ports, in front of that gateway.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from openai import OpenAI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.stack import ROOT, ServiceProcess, free_port
from tools.envoy_config import PREDICTIONS as PREDICTIONS_ADDRESS
from tools.envoy_config import render_config

DESCRIPTOR = ROOT / "build" / "inference.pb"

# name -> (scopes, limits); the plain keys are random per session.
TEST_KEYS: dict[str, dict[str, Any]] = {
    "admin": {"scopes": ["generate", "embed", "admin"]},
    "user": {"scopes": ["generate", "embed"]},
    "embed-only": {"scopes": ["embed"]},
    "revoked": {"scopes": ["generate", "embed"], "revoked": True},
    "limited": {"scopes": ["generate", "embed"], "requests_per_minute": 60, "burst": 3},
    "token-limited": {"scopes": ["generate", "embed"], "tokens_per_minute": 30},
}


def render_envoy(
    listen_port: int,
    admin_port: int,
    gateway_address: str,
    descriptor: Path,
    otlp_endpoint: str = "",
    cors_origins: str = "",
    predictions_address: str = PREDICTIONS_ADDRESS,
    limits: Any = None,
    tls: tuple[Path, Path] | None = None,
    tls_sds_dir: Path | None = None,
) -> str:
    cert, key = tls or ("", "")
    return render_config(
        listen_port,
        admin_port,
        gateway_address,
        descriptor,
        otlp_endpoint,
        cors_origins=cors_origins,
        predictions_address=predictions_address,
        limits=limits,
        tls_cert=str(cert),
        tls_key=str(key),
        tls_sds_dir=str(tls_sds_dir or ""),
    )


@dataclass
class SpanRecord:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    # The gRPC status code the span recorded (rpc.grpc.status_code), -1 when it has none.
    grpc_code: int = -1


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        self.address = ""

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            SpanRecord(
                                service,
                                span.name,
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                span.kind,
                                next(
                                    (
                                        a.value.int_value
                                        for a in span.attributes
                                        if a.key == "rpc.grpc.status_code"
                                    ),
                                    -1,
                                ),
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 10.0
    ) -> list[SpanRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.1)
        with self._lock:
            return list(self.spans)


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OtlpCollector]:
    collector = OtlpCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.address = f"127.0.0.1:{port}"
    yield collector
    server.stop(grace=None)


@dataclass
class GatewayService:
    address: str
    metrics_port: int
    process: ServiceProcess
    keys: dict[str, str] = field(default_factory=dict)
    keys_file: Path | None = None

    def metadata(self, name: str = "user") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[name]}"),)

    def headers(self, name: str = "user") -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[name]}"}


def write_key_file(path: Path) -> dict[str, str]:
    plain = {name: f"sk-test-{name}-{secrets.token_hex(8)}" for name in TEST_KEYS}
    entries = [
        {"name": name, "sha256": hashlib.sha256(plain[name].encode()).hexdigest(), **spec}
        for name, spec in TEST_KEYS.items()
    ]
    path.write_text(json.dumps({"keys": entries}, indent=2))
    return plain


def start_gateway(
    generator_address: str,
    embedder_address: str,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    name: str = "gateway",
) -> tuple[ServiceProcess, str, int]:
    port, metrics_port = free_port(), free_port()
    process = ServiceProcess.python_module(
        name,
        "services.gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--generator-addresses",
        generator_address,
        "--embedder-addresses",
        embedder_address,
        *extra_args,
        env={"HF_HUB_OFFLINE": "1", **(env or {})},
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        process.wait_until_serving(address, timeout=60)
    except BaseException:
        process.stop()
        raise
    return process, address, metrics_port


@pytest.fixture(scope="session")
def gateway_service(
    generator_address: str,
    embedder_address: str,
    otlp_collector: OtlpCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayService]:
    keys_file = tmp_path_factory.mktemp("gateway-keys") / "keys.json"
    keys = write_key_file(keys_file)
    process, address, metrics_port = start_gateway(
        generator_address,
        embedder_address,
        ("--api-keys-file", str(keys_file), "--otlp-endpoint", otlp_collector.address),
    )
    yield GatewayService(address, metrics_port, process, keys, keys_file)
    process.stop()


def run_envoy(config: Path, name: str, listen_port: int, https: bool = False) -> tuple[ServiceProcess, str]:
    """Envoy started on a rendered `config` that listens on `listen_port`, with its URL, once it
    answers /healthz (which it does whether or not the gateway is up)."""
    envoy = shutil.which("envoy") or str(ROOT / ".venv" / "bin" / "envoy")
    # A distinct base id per Envoy, so that several can run on one machine (shared memory).
    base_id = 1000 + (os.getpid() * 7 + listen_port) % 50000
    process = ServiceProcess(
        name, [envoy, "-c", str(config), "--base-id", str(base_id), "--log-level", "warn"]
    ).start()
    url = f"{'https' if https else 'http'}://127.0.0.1:{listen_port}"
    unverified = ssl._create_unverified_context() if https else None
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2, context=unverified) as reply:
                if reply.status == 200:
                    return process, url
        except OSError:
            pass
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"envoy did not come up:\n{process.log_tail()}")
        time.sleep(0.1)


@dataclass
class EnvoyService:
    url: str
    admin_port: int
    process: ServiceProcess


def start_envoy(
    gateway_address: str,
    workdir: Path,
    name: str = "envoy",
    descriptor: Path = DESCRIPTOR,
    otlp_endpoint: str = "",
    cors_origins: str = "",
    predictions_address: str = PREDICTIONS_ADDRESS,
    limits: Any = None,
    tls: tuple[Path, Path] | None = None,
) -> EnvoyService:
    """Envoy rendered onto free ports; `limits` (EdgeLimits) and `tls` (certificate, key) as
    render_envoy takes them. With TLS the URL is https:// (its readiness probe does not verify)."""
    listen_port, admin_port = free_port(), free_port()
    config = workdir / "envoy.yaml"
    config.write_text(
        render_envoy(
            listen_port,
            admin_port,
            gateway_address,
            descriptor,
            otlp_endpoint,
            cors_origins,
            predictions_address,
            limits,
            tls,
            workdir,
        )
    )
    process, url = run_envoy(config, name, listen_port, https=tls is not None)
    return EnvoyService(url, admin_port, process)


ERROR_DETAILS_PROTO = "google/rpc/error_details.proto"


def descriptor_has_error_details(path: Path) -> bool:
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    return any(item.name == ERROR_DETAILS_PROTO for item in files)


def descriptor_for_envoy() -> Path:
    """build/inference.pb, which must carry the google.rpc detail types: without them Envoy
    answers errors with an empty body."""
    if not DESCRIPTOR.exists():
        pytest.fail(f"{DESCRIPTOR} is missing: run `make descriptor`")
    assert descriptor_has_error_details(DESCRIPTOR), f"{DESCRIPTOR} lacks {ERROR_DETAILS_PROTO}"
    return DESCRIPTOR


@pytest.fixture(scope="session")
def envoy_service(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyService]:
    workdir = tmp_path_factory.mktemp("envoy")
    service = start_envoy(gateway_service.address, workdir, descriptor=descriptor_for_envoy())
    yield service
    service.process.stop()


@pytest.fixture(scope="session")
def envoy_url(envoy_service: EnvoyService) -> str:
    return envoy_service.url


@pytest.fixture(scope="session")
def openai_sdk(envoy_url: str, gateway_service: GatewayService) -> Iterator[OpenAI]:
    """The official openai SDK on the shared stack's Envoy, as the "user" key, without retries."""
    with OpenAI(
        base_url=f"{envoy_url}/v1", api_key=gateway_service.keys["user"], max_retries=0, timeout=180
    ) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def generation_model(envoy_url: str, gateway_service: GatewayService) -> str:
    """The id the shared stack serves its generation model under, as GET /models lists it."""
    request = urllib.request.Request(f"{envoy_url}/models", headers=gateway_service.headers())
    with urllib.request.urlopen(request, timeout=30) as reply:
        served = json.load(reply)["models"]
    return str(next(model["id"] for model in served if model["task"] == "generation"))
