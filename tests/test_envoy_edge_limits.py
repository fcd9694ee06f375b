"""Envoy's edge limits end to end: oversized bodies get 413 in JSON at the edge and never reach the
gateway, header limits give 431 in JSON, slow clients are cut off by the timeouts, an overloaded
Envoy sheds requests (503, Retry-After, JSON) and connections past its bound, and HTTPS (and
gRPC over TLS) serves a certificate the test makes, replaced on disk without restarting Envoy.

Envoy runs here with short timeouts (the other limits are the defaults) in front of the session's
gateway; the TLS cases start their own Envoy with a CA and certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import select
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures_gateway import (
    EnvoyService,
    GatewayService,
    descriptor_for_envoy,
    render_envoy,
    start_envoy,
)
from tests.stack import ROOT, ServiceProcess, free_port, metric_samples
from tools.envoy_config import edge_limits

# Short enough for tests, long enough for a loaded 2-core machine to send a normal request.
HEADERS_TIMEOUT = 2.0
REQUEST_TIMEOUT = 3.0
IDLE_TIMEOUT = 3.0
# Closing is checked within the timeout plus this (timer granularity, a busy machine).
MARGIN = 4.0
TEXT_LIMIT = 1 << 20


def short_timeouts() -> Any:
    return edge_limits(
        {},
        request_headers_timeout_seconds=HEADERS_TIMEOUT,
        request_timeout_seconds=REQUEST_TIMEOUT,
        idle_timeout_seconds=IDLE_TIMEOUT,
    )


@pytest.fixture(scope="module")
def edge(gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyService]:
    service = start_envoy(
        gateway_service.address,
        tmp_path_factory.mktemp("edge-envoy"),
        name="edge-envoy",
        descriptor=descriptor_for_envoy(),
        limits=short_timeouts(),
    )
    yield service
    service.process.stop()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def gateway_calls(gateway: GatewayService) -> float:
    """Every call the gateway has counted (all methods, keys and codes)."""
    samples = metric_samples(gateway.metrics_port, timeout=10)
    return sum(value for name, _, value in samples if name == "gateway_requests_total")


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int


def post_body(port: int, path: str, size: int, headers: dict[str, str] | None = None) -> RawReply:
    """POST `size` bytes as a polite client would: it stops sending as soon as an answer arrives
    (Envoy answers a 413 before the body ends and then closes)."""
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    lines += [f"Content-Length: {size}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        while sent < size:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk[: size - sent])
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    break
        sock.setblocking(True)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected(data):
            try:
                part = sock.recv(65536)
            except OSError:
                break
            if not part:
                break
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return RawReply(int(status_line.split()[1]), parsed, body, sent)


def _expected(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return len(head) + len(sep) + int(value)
    return len(data) + 1


def seconds_until_closed(sock: socket.socket, started: float, limit: float) -> float:
    """Seconds from `started` until the peer closed `sock` (reading what it sends); inf past `limit`."""
    sock.settimeout(0.5)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return float("inf")


# --- Bodies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "openai"), [("/v1/chat/completions", True), ("/generate", False), ("/v1/embeddings", True)]
)
def test_an_oversized_body_is_refused_at_the_edge(
    edge: EnvoyService, gateway_service: GatewayService, path: str, openai: bool
) -> None:
    size = (20 << 20) if "embeddings" in path else 2 * TEXT_LIMIT
    before = gateway_calls(gateway_service)
    reply = post_body(port_of(edge.url), path, size, gateway_service.headers())
    assert reply.status == 413, reply
    assert reply.headers["content-type"] == "application/json"
    error = json.loads(reply.body)
    limit = "16 MiB (16777216 bytes)" if "embeddings" in path else "1 MiB (1048576 bytes)"
    if openai:
        assert error["error"]["code"] == "request_too_large"
        assert error["error"]["type"] == "invalid_request_error"
        assert limit in error["error"]["message"]
    else:
        assert error["code"] == 3 and limit in error["message"]
    assert gateway_calls(gateway_service) == before, "the gateway saw the oversized request"


def test_embeddings_take_a_larger_body_than_text(edge: EnvoyService, gateway_service: GatewayService) -> None:
    # 2 MiB: over the text limit, under the embeddings one, so it reaches the gateway (which
    # judges the input itself).
    body = json.dumps({"model": "any", "input": ["word " * (2 * TEXT_LIMIT // 5)]})
    before = gateway_calls(gateway_service)
    reply = httpx.post(
        f"{edge.url}/v1/embeddings",
        content=body,
        headers={**gateway_service.headers(), "content-type": "application/json"},
        timeout=120,
    )
    assert reply.status_code != 413, reply.text
    assert gateway_calls(gateway_service) == before + 1


# --- Headers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["count", "size"])
def test_header_limits_answer_431_in_json(
    edge: EnvoyService, gateway_service: GatewayService, kind: str
) -> None:
    limits = short_timeouts()
    if kind == "count":
        extra = {f"x-extra-{i}": "1" for i in range(limits.max_headers_count + 1)}
    else:
        extra = {"x-large": "v" * (limits.max_request_headers_kb * 1024 + 1)}
    reply = httpx.get(f"{edge.url}/v1/models", headers={**gateway_service.headers(), **extra}, timeout=30)
    assert reply.status_code == 431
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["message"] == "Request Header Fields Too Large"
    # Within the limits the same request is served.
    served = httpx.get(f"{edge.url}/v1/models", headers=gateway_service.headers(), timeout=30)
    assert served.status_code == 200


# --- Slow clients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "timeout"),
    [
        (b"", IDLE_TIMEOUT),
        (b"POST /v1/chat/comp", HEADERS_TIMEOUT),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1\r\n", HEADERS_TIMEOUT),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{",
            REQUEST_TIMEOUT,
        ),
    ],
    ids=["silent", "partial-request-line", "partial-headers", "partial-body"],
)
def test_slow_clients_are_closed_by_the_timeouts(edge: EnvoyService, sent: bytes, timeout: float) -> None:
    with socket.create_connection(("127.0.0.1", port_of(edge.url)), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        closed = seconds_until_closed(sock, started, max(timeout, REQUEST_TIMEOUT) + MARGIN)
    assert closed <= max(timeout, REQUEST_TIMEOUT) + MARGIN
    assert closed >= timeout - 0.5, "closed before its timeout"


# --- TLS ------------------------------------------------------------------------------------------


@dataclass
class Certificates:
    folder: Path
    ca_pem: bytes

    @property
    def cert(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def key(self) -> Path:
        return self.folder / "tls.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("edge test CA"))
        .issuer_name(_name("edge test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def write_server_pair(
    folder: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], common_name: str
) -> x509.Certificate:
    """A new key and a certificate for localhost and 127.0.0.1, moved into `folder` (key first)
    as a renewal would."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    staged = folder.parent / f"staged-{common_name}"
    staged.mkdir()
    (staged / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (staged / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(staged / "tls.key", folder / "tls.key")
    os.replace(staged / "tls.crt", folder / "tls.crt")
    return cert


@pytest.fixture(scope="module")
def tls_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return make_ca()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory, tls_ca: Any) -> Certificates:
    folder = tmp_path_factory.mktemp("edge-tls") / "certs"
    folder.mkdir()
    write_server_pair(folder, tls_ca, "first")
    return Certificates(folder, tls_ca[1].public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def tls_edge(
    gateway_service: GatewayService, certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyService]:
    service = start_envoy(
        gateway_service.address,
        tmp_path_factory.mktemp("tls-envoy"),
        name="tls-envoy",
        descriptor=descriptor_for_envoy(),
        tls=(certificates.cert, certificates.key),
    )
    yield service
    service.process.stop()


def served_certificate(port: int, ca_pem: bytes) -> x509.Certificate:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def negotiated(port: int, ca_pem: bytes, protocols: list[str]) -> str | None:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(protocols)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        return sock.selected_alpn_protocol()


def test_https_and_grpc_over_tls(
    tls_edge: EnvoyService, certificates: Certificates, gateway_service: GatewayService
) -> None:
    assert tls_edge.url.startswith("https://")
    context = ssl.create_default_context(cadata=certificates.ca_pem.decode())
    url = tls_edge.url.replace("127.0.0.1", "localhost")
    with httpx.Client(verify=context, timeout=30) as client:
        assert client.get(f"{url}/healthz").status_code == 200
        models = client.get(f"{url}/v1/models", headers=gateway_service.headers())
        assert models.status_code == 200 and models.json()["data"], models.text
        assert models.http_version == "HTTP/1.1"
    # ALPN offers both: h2 first (gRPC), http/1.1 for the rest.
    assert negotiated(port_of(tls_edge.url), certificates.ca_pem, ["h2", "http/1.1"]) == "h2"
    assert negotiated(port_of(tls_edge.url), certificates.ca_pem, ["http/1.1"]) == "http/1.1"
    # Plain HTTP on the TLS port is refused, not served.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port_of(tls_edge.url)}/healthz", timeout=10)
    # Native gRPC over TLS (ALPN h2) through Envoy to the gateway.
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates.ca_pem)
    with grpc.secure_channel(f"localhost:{port_of(tls_edge.url)}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_renewed_certificate_is_served_without_a_restart(
    tls_edge: EnvoyService, certificates: Certificates, tls_ca: Any
) -> None:
    port = port_of(tls_edge.url)
    pid = tls_edge.process.pid
    first = served_certificate(port, certificates.ca_pem)
    renewed = write_server_pair(certificates.folder, tls_ca, "renewed")
    assert renewed.serial_number != first.serial_number
    deadline = time.monotonic() + 30
    while served_certificate(port, certificates.ca_pem).serial_number != renewed.serial_number:
        assert time.monotonic() < deadline, "Envoy still serves the old certificate after 30 s"
        time.sleep(0.25)
    assert tls_edge.process.pid == pid and tls_edge.process.alive()


# --- Overload -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overloaded_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, ServiceProcess]]:
    """Envoy whose heap bound (1 MiB) is always exceeded and which takes 4 connections at once;
    nothing behind it (no request gets that far)."""
    envoy = shutil.which("envoy") or str(ROOT / ".venv" / "bin" / "envoy")
    port, admin = free_port(), free_port()
    config = tmp_path_factory.mktemp("overloaded-envoy") / "envoy.yaml"
    limits = edge_limits({}, max_heap_bytes=1 << 20, max_connections=4)
    config.write_text(render_envoy(port, admin, "127.0.0.1:9", descriptor_for_envoy(), limits=limits))
    base_id = 1000 + (os.getpid() * 7 + port) % 50000
    process = ServiceProcess(
        "overloaded-envoy", [envoy, "-c", str(config), "--base-id", str(base_id), "--log-level", "error"]
    ).start()
    try:
        process.wait_until_port_open(port)
        yield port, process
    finally:
        process.stop()


def test_an_overloaded_edge_sheds_requests_with_503_and_retry_after(
    overloaded_edge: tuple[int, ServiceProcess],
) -> None:
    port, _ = overloaded_edge
    deadline = time.monotonic() + 30
    while True:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=10)
        # Until the heap monitor's first reading (every 0.25 s) the request goes on and fails.
        if "envoy overloaded" in reply.text or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["error"] == {
        "message": "envoy overloaded",
        "type": "server_error",
        "param": None,
        "code": "service_unavailable",
    }
    native = httpx.get(f"http://127.0.0.1:{port}/models", timeout=10)
    assert (native.status_code, native.json()) == (503, {"code": 14, "message": "envoy overloaded"})
    assert native.headers["retry-after"] == "1"


def test_connections_past_the_bound_are_closed_at_accept(overloaded_edge: tuple[int, ServiceProcess]) -> None:
    port, _ = overloaded_edge
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            started = time.monotonic()
            closed = seconds_until_closed(extra, started, 5.0)
        assert closed < 2.0, "a connection over the bound was kept open"
        # The held ones are still open: only the one over the bound was closed.
        for sock in held:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in held:
            sock.close()
