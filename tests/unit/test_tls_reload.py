"""TLS files and their renewal, against an in-process gRPC server over loopback (no processes):
a TLS server without a CA passes its health check, a CA without a certificate is refused, a
broken renewal is read once and logged once, and the gateway's and the predictions service's
client channels present a renewed client certificate on their next connection."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import tls
from services.gateway.backends import Backend
from tests.test_mtls import Authority, Issued, issue, make_ca
from tools import healthcheck
from tools.healthcheck import grpc_status


@dataclass
class RecordingHealth(health.HealthServicer):  # type: ignore[misc]
    """The health service, noting the serial of each caller's client certificate."""

    serials: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> object:
        # grpc gives each property as a list of bytes (its stub says bytes).
        pems: list[bytes] = list(context.auth_context().get("x509_pem_cert") or [])  # type: ignore[arg-type]
        if pems:
            self.serials.append(int(x509.load_pem_x509_certificate(pems[0]).serial_number))
        return super().Check(request, context)


@dataclass
class Served:
    address: str
    health: RecordingHealth


def serve(files: tls.TlsFiles) -> Iterator[Served]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(files))
    server.start()
    try:
        yield Served(f"127.0.0.1:{port}", servicer)
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_ca(tmp_path_factory.mktemp("ca"), "unit-ca")


@pytest.fixture
def server_cert(authority: Authority, tmp_path: Path) -> Issued:
    return issue(authority, tmp_path, "server")


def renew(authority: Authority, old: Issued, folder: Path) -> Issued:
    """A new certificate and key (new serial) renamed over `old`'s files, as cert-manager does."""
    folder.mkdir(exist_ok=True)
    renewed = issue(authority, folder, old.cert.stem)
    os.replace(renewed.key, old.key)
    os.replace(renewed.cert, old.cert)
    return Issued(old.cert, old.key, renewed.serial)


# -- a TLS server without a CA ---------------------------------------------------------------------


def test_a_tls_server_without_a_ca_passes_its_own_health_check(
    server_cert: Issued, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = tls.TlsFiles("", str(server_cert.cert), str(server_cert.key))
    assert own.serves_tls and not own.mutual
    for served in serve(own):
        # As run.probe and the containers' health checks ask: with the tier's own files.
        assert grpc_status(served.address, timeout=5, tls_files=own) == "SERVING"
        # In plaintext it is not reachable: the check above really spoke TLS.
        assert grpc_status(served.address, timeout=5) == "UNREACHABLE"
        monkeypatch.setenv("GENERATOR_TLS_CERT", own.cert)
        monkeypatch.setenv("GENERATOR_TLS_KEY", own.key)
        monkeypatch.delenv("GENERATOR_TLS_CA", raising=False)
        port = served.address.rsplit(":", 1)[1]
        assert healthcheck.main(["--port", port, "--tls-env", "GENERATOR"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"


def test_a_server_with_a_ca_but_no_certificate_is_refused(authority: Authority) -> None:
    with pytest.raises(ValueError, match=r"--tls-ca \(GENERATOR_TLS_CA\) needs --tls-cert"):
        tls.check_files("GENERATOR", str(authority.path), "", "")


def test_the_self_check_keeps_a_ca_and_plaintext_as_they_are(server_cert: Issued) -> None:
    mutual = tls.TlsFiles("ca.pem", str(server_cert.cert), str(server_cert.key))
    assert tls.self_check_files(mutual) == mutual
    assert tls.self_check_files(tls.PLAINTEXT) == tls.PLAINTEXT
    own = tls.TlsFiles("", str(server_cert.cert), str(server_cert.key))
    assert tls.self_check_files(own) == tls.TlsFiles(ca=str(server_cert.cert))


# -- renewal of a server's files -------------------------------------------------------------------


def test_a_renewal_is_read_once_and_a_broken_one_logged_once(
    authority: Authority,
    server_cert: Issued,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = tls.TlsFiles(str(authority.path), str(server_cert.cert), str(server_cert.key))
    reloader = tls.CertificateReloader(files)
    reads: list[str] = []
    real_read = tls._read

    def counting_read(path: str) -> bytes:
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(tls, "_read", counting_read)
    renewed_folder = tmp_path / "renewed"
    renewed_folder.mkdir()
    renewed = issue(authority, renewed_folder, "server")
    # A new key beside the old certificate: not a pair, refused on every handshake, logged once.
    os.replace(renewed.key, server_cert.key)
    with caplog.at_level(logging.WARNING, logger="services.common.tls"):
        for _ in range(5):
            assert reloader() is None
    assert reloader.failures == 1 and reloader.reloads == 0
    assert len([record for record in caplog.records if "do not load" in record.message]) == 1
    reads.clear()
    os.replace(renewed.cert, server_cert.cert)
    assert reloader() is not None and reloader.reloads == 1
    # The bytes that were checked as a pair are the bytes handed to grpc: each file read once.
    assert sorted(reads) == sorted([files.ca, files.cert, files.key])
    assert reloader() is None


# -- client channels that follow a renewed client certificate --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mutual_server(authority: Authority, server_cert: Issued) -> Iterator[Served]:
    yield from serve(tls.TlsFiles(str(authority.path), str(server_cert.cert), str(server_cert.key)))


async def check(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_gateways_replica_channels_present_a_renewed_client_certificate(
    authority: Authority, mutual_server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = issue(authority, tmp_path, "gateway")
    files = tls.TlsFiles(str(authority.path), str(client.cert), str(client.key))
    clock = Clock()
    backend = Backend("generator", mutual_server.address, 1, [], False, tls_files=files, clock=clock)
    try:
        first = backend.pick()
        await check(first.channel)
        assert mutual_server.health.serials[-1] == client.serial
        renewed = renew(authority, client, tmp_path / "renewed")
        # Checked at most once a second: not yet.
        clock.now += 0.5
        assert backend.pick().channel is first.channel
        clock.now += 1.0
        replica = backend.pick()
        assert backend.reloads == 1 and replica is first
        # A new connection, with the new certificate; the gateway was not restarted.
        await check(replica.channel)
        assert mutual_server.health.serials[-1] == renewed.serial
        assert backend.replica_channels[replica.address] is replica.channel
    finally:
        await backend.close()


async def test_a_broken_client_renewal_keeps_the_current_channel(
    authority: Authority, mutual_server: Served, tmp_path: Path
) -> None:
    client = issue(authority, tmp_path, "gateway")
    files = tls.TlsFiles(str(authority.path), str(client.cert), str(client.key))
    clock = Clock()
    backend = Backend("generator", mutual_server.address, 1, [], False, tls_files=files, clock=clock)
    try:
        channel = backend.pick().channel
        (tmp_path / "half").mkdir()
        half = issue(authority, tmp_path / "half", "gateway")
        os.replace(half.key, client.key)  # the key alone: not a pair with the current certificate
        clock.now += 2
        assert backend.pick().channel is channel and backend.reloads == 0
        await check(channel)
    finally:
        await backend.close()


async def test_the_predictions_channel_presents_a_renewed_client_certificate(
    authority: Authority, mutual_server: Served, tmp_path: Path
) -> None:
    client = issue(authority, tmp_path, "predictions")
    files = tls.TlsFiles(str(authority.path), str(client.cert), str(client.key))
    clock = Clock()
    reloading = tls.ReloadingChannel(
        lambda loaded: tls.aio_channel(mutual_server.address, files, loaded=loaded),
        files,
        "predictions -> gateway",
        grace=0.5,
        clock=clock,
    )
    try:
        first = reloading.current()
        await check(first)
        assert mutual_server.health.serials[-1] == client.serial
        renewed = renew(authority, client, tmp_path / "renewed")
        clock.now += 1.5
        second = reloading.current()
        assert second is not first and reloading.reloads == 1
        await check(second)
        assert mutual_server.health.serials[-1] == renewed.serial
    finally:
        await reloading.close()
