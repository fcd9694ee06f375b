"""Mutual TLS between the tiers, with certificates made here: a CA, a certificate per tier for
localhost/127.0.0.1, and a second CA whose client certificate must be refused. The generator,
embedder, gateway and predictions service serve mutual TLS, the predictions runner calls the
gateway over it and Envoy talks to the gateway and predictions over it; a REST request and a
prediction through Envoy work, a plaintext client and a foreign CA's client are refused, and a certificate
replaced on disk is served at the next handshake without a restart."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2_grpc
from inference.v1 import generation_pb2, generation_pb2_grpc

from services.common import tls
from services.common.config import load_config
from services.generator.config import GeneratorConfig
from tests.fixtures_gateway import DESCRIPTOR, run_envoy
from tests.stack import ROOT, ServiceProcess, free_port
from tools.envoy_config import render_config
from tools.healthcheck import grpc_status

# -- certificates -----------------------------------------------------------------------------------


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


@dataclass
class Issued:
    cert: Path
    key: Path
    serial: int


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_ca(folder: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(key, cert, path)


def issue(ca: Authority, folder: Path, name: str) -> Issued:
    """A certificate for localhost and 127.0.0.1, for serving and as a client (one per tier)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    issued = Issued(folder / f"{name}.crt", folder / f"{name}.key", serial)
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return issued


@dataclass
class Pki:
    folder: Path
    ca: Authority
    foreign_ca: Authority
    tiers: dict[str, Issued]

    def files(self, name: str, ca: Authority | None = None) -> tls.TlsFiles:
        issued = self.tiers[name]
        return tls.TlsFiles(str((ca or self.ca).path), str(issued.cert), str(issued.key))

    def args(self, name: str) -> list[str]:
        files = self.files(name)
        return ["--tls-ca", files.ca, "--tls-cert", files.cert, "--tls-key", files.key]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, foreign = make_ca(folder, "stack-ca"), make_ca(folder, "foreign-ca")
    tiers = {
        name: issue(ca, folder, name)
        for name in ("generator", "embedder", "gateway", "predictions", "envoy", "client")
    }
    tiers["foreign"] = issue(foreign, folder, "foreign")
    return Pki(folder, ca, foreign, tiers)


# -- the stack on mutual TLS ------------------------------------------------------------------------


@dataclass
class MtlsStack:
    generator: str
    generator_process: ServiceProcess
    embedder: str
    gateway: str
    predictions: str
    envoy_url: str
    envoy_admin_port: int


def wait_serving(process: ServiceProcess, address: str, files: tls.TlsFiles, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    status = "UNREACHABLE"
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        status = grpc_status(address, timeout=2, tls_files=files)
        if status == "SERVING":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{process.name} still {status} after {timeout:.0f}s:\n{process.log_tail()}")


def start_tier(name: str, pki: Pki, *args: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    process = ServiceProcess.python_module(
        name,
        f"services.{name}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *pki.args(name),
        *args,
        env={"HF_HUB_OFFLINE": "1"},
    ).start()
    return process, f"127.0.0.1:{port}"


def start_envoy_with_upstream_tls(
    gateway: str, predictions: str, pki: Pki, workdir: Path, server_name: str = ""
) -> tuple[ServiceProcess, str, int]:
    """Envoy on free ports in front of `gateway` and `predictions`, on mutual TLS to both (its SDS
    files beside its configuration); returns it, its URL and its admin port."""
    listen, admin = free_port(), free_port()
    files = pki.files("envoy")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "envoy.yaml"
    config.write_text(
        render_config(
            listen,
            admin,
            gateway,
            DESCRIPTOR,
            predictions_address=predictions,
            tls_sds_dir=str(workdir),
            upstream_tls_server_name=server_name,
            upstream_tls_ca=files.ca,
            upstream_tls_cert=files.cert,
            upstream_tls_key=files.key,
        )
    )
    process, url = run_envoy(config, "envoy-mtls", listen)
    return process, url, admin


@pytest.fixture(scope="module")
def mtls_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsStack]:
    processes: list[ServiceProcess] = []
    try:
        # Both models load at once.
        generator, generator_address = start_tier("generator", pki)
        processes.append(generator)
        embedder, embedder_address = start_tier("embedder", pki)
        processes.append(embedder)
        wait_serving(generator, generator_address, pki.files("generator"))
        wait_serving(embedder, embedder_address, pki.files("embedder"))
        gateway, gateway_address = start_tier(
            "gateway",
            pki,
            "--generator-addresses",
            generator_address,
            "--embedder-addresses",
            embedder_address,
        )
        processes.append(gateway)
        wait_serving(gateway, gateway_address, pki.files("gateway"), timeout=60)
        database = tmp_path_factory.mktemp("predictions-mtls") / "predictions.db"
        predictions, predictions_address = start_tier(
            "predictions",
            pki,
            "--database-url",
            f"sqlite+aiosqlite:///{database}",
            "--gateway-address",
            gateway_address,
            "--poll-seconds",
            "0.2",
        )
        processes.append(predictions)
        wait_serving(predictions, predictions_address, pki.files("predictions"), timeout=60)
        workdir = tmp_path_factory.mktemp("envoy-mtls")
        envoy, envoy_url, envoy_admin = start_envoy_with_upstream_tls(
            gateway_address, predictions_address, pki, workdir
        )
        processes.append(envoy)
        yield MtlsStack(
            generator_address,
            generator,
            embedder_address,
            gateway_address,
            predictions_address,
            envoy_url,
            envoy_admin,
        )
    finally:
        for process in reversed(processes):
            process.stop(grace=10)


def post(
    url: str, body: dict[str, object], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        raw = error.read() or b"{}"
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, {"body": raw.decode(errors="replace")}


def test_a_rest_request_through_envoy_crosses_every_tier_on_mutual_tls(mtls_stack: MtlsStack) -> None:
    status, reply = post(
        mtls_stack.envoy_url + "/generate",
        {"prompt": "Hello", "parameters": {"max_new_tokens": 3, "do_sample": False}},
    )
    assert status == 200, reply
    assert isinstance(reply.get("generated_text"), str)
    status, reply = post(mtls_stack.envoy_url + "/embeddings", {"input": ["hello"]})
    assert status == 200, reply
    data = reply["data"]
    assert isinstance(data, list) and len(data[0]["embedding"]) > 0


def test_a_prediction_through_envoy_runs_on_mutual_tls(mtls_stack: MtlsStack, pki: Pki) -> None:
    """Envoy -> predictions, and the runner's channel to the gateway, both on mutual TLS: a runner
    on a plaintext channel would fail the prediction (the gateway refuses it)."""
    with urllib.request.urlopen(mtls_stack.envoy_url + "/models", timeout=30) as reply:
        models = json.loads(reply.read())["models"]
    model = next(item["id"] for item in models if item["task"] == "generation")
    body: dict[str, object] = {
        "model": model,
        "input": {"prompt": "Hello", "parameters": {"max_new_tokens": 3, "do_sample": False}},
    }
    status, created = post(mtls_stack.envoy_url + "/v1/predictions", body, {"prefer": "wait=60"})
    assert status == 201, created
    deadline = time.monotonic() + 120
    prediction = created
    while prediction["status"] not in ("succeeded", "failed", "canceled"):
        assert time.monotonic() < deadline, prediction
        time.sleep(0.3)
        url = f"{mtls_stack.envoy_url}/v1/predictions/{created['id']}"
        with urllib.request.urlopen(url, timeout=30) as reply:
            prediction = json.loads(reply.read())
    assert prediction["status"] == "succeeded", prediction
    assert isinstance(prediction["output"], dict | str | list) and prediction["output"]
    # The predictions service itself refuses plaintext, like the other tiers.
    assert grpc_status(mtls_stack.predictions, timeout=5) == "UNREACHABLE"
    assert grpc_status(mtls_stack.predictions, timeout=5, tls_files=pki.files("client")) == "SERVING"


def test_envoy_refuses_an_upstream_whose_certificate_names_another_host(
    mtls_stack: MtlsStack, pki: Pki, tmp_path: Path
) -> None:
    """The CA alone is not enough: the gateway's certificate (localhost, 127.0.0.1) must name the
    host Envoy expects, here another one, so Envoy refuses it and the request fails at the edge."""
    envoy, url, _ = start_envoy_with_upstream_tls(
        mtls_stack.gateway, mtls_stack.predictions, pki, tmp_path, server_name="not-the-gateway.example"
    )
    try:
        status, reply = post(url + "/generate", {"prompt": "Hi", "parameters": {"max_new_tokens": 2}})
        assert status == 503, reply
    finally:
        envoy.stop(grace=5)
    # The same files with the name the certificate carries: served.
    envoy, url, _ = start_envoy_with_upstream_tls(
        mtls_stack.gateway, mtls_stack.predictions, pki, tmp_path / "named", server_name="localhost"
    )
    try:
        status, reply = post(url + "/generate", {"prompt": "Hi", "parameters": {"max_new_tokens": 2}})
        assert status == 200, reply
    finally:
        envoy.stop(grace=5)


def test_the_generator_refuses_plaintext_and_foreign_clients(mtls_stack: MtlsStack, pki: Pki) -> None:
    address = mtls_stack.generator
    assert grpc_status(address, timeout=5, tls_files=pki.files("client")) == "SERVING"
    # Plaintext, TLS without a client certificate, and a certificate from another CA.
    assert grpc_status(address, timeout=5) == "UNREACHABLE"
    assert grpc_status(address, timeout=5, tls_files=tls.TlsFiles(str(pki.ca.path))) == "UNREACHABLE"
    foreign = tls.TlsFiles(str(pki.ca.path), str(pki.tiers["foreign"].cert), str(pki.tiers["foreign"].key))
    assert grpc_status(address, timeout=5, tls_files=foreign) == "UNREACHABLE"
    # The same refusal on a real call, not only on the health service.
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(prompt="Hello"), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The embedder, the other back door, refuses plaintext too.
    assert grpc_status(mtls_stack.embedder, timeout=5) == "UNREACHABLE"


def served_serial(address: str, pki: Pki) -> int:
    """The serial of the certificate the server presents in a new handshake (with our client cert)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    context.load_cert_chain(str(pki.tiers["client"].cert), str(pki.tiers["client"].key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_a_renewed_certificate_is_served_without_a_restart(mtls_stack: MtlsStack, pki: Pki) -> None:
    address = mtls_stack.generator
    old = pki.tiers["generator"]
    assert served_serial(address, pki) == old.serial
    pid = mtls_stack.generator_process.pid
    renewed_folder = pki.folder / "renewed"
    renewed_folder.mkdir(exist_ok=True)
    renewed = issue(pki.ca, renewed_folder, "generator")
    # As cert-manager and most renewals do: the new files are renamed into place.
    os.replace(renewed.key, old.key)
    os.replace(renewed.cert, old.cert)
    assert served_serial(address, pki) == renewed.serial
    assert mtls_stack.generator_process.pid == pid and mtls_stack.generator_process.alive()
    # Still usable end to end: the gateway's next connections verify the new certificate.
    assert grpc_status(address, timeout=5, tls_files=pki.files("client")) == "SERVING"
    status, reply = post(
        mtls_stack.envoy_url + "/generate", {"prompt": "Hi", "parameters": {"max_new_tokens": 2}}
    )
    assert status == 200, reply


def test_the_health_check_speaks_mutual_tls_from_the_tiers_variables(mtls_stack: MtlsStack, pki: Pki) -> None:
    files = pki.files("generator")
    port = mtls_stack.generator.rsplit(":", 1)[1]
    env = {
        **os.environ,
        "GENERATOR_TLS_CA": files.ca,
        "GENERATOR_TLS_CERT": files.cert,
        "GENERATOR_TLS_KEY": files.key,
    }
    check = [sys.executable, "-m", "tools.healthcheck", "--port", port]
    with_tls = subprocess.run(
        [*check, "--tls-env", "GENERATOR"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert (with_tls.returncode, with_tls.stdout.strip()) == (0, "SERVING"), with_tls.stderr
    plain = subprocess.run(check, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert (plain.returncode, plain.stdout.strip()) == (1, "UNREACHABLE")


# -- configuration errors (no process) --------------------------------------------------------------


def test_incomplete_tls_settings_are_refused_naming_the_setting(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = str(pki.tiers["generator"].cert)
    with pytest.raises(SystemExit):
        load_config(GeneratorConfig, "GENERATOR", "", ["--tls-cert", cert])
    assert "--tls-cert (GENERATOR_TLS_CERT) needs --tls-key (GENERATOR_TLS_KEY)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(GeneratorConfig, "GENERATOR", "", ["--tls-ca", str(pki.folder / "missing.pem")])
    assert "--tls-ca (GENERATOR_TLS_CA): no such file" in capsys.readouterr().err
    config = load_config(GeneratorConfig, "GENERATOR", "", pki.args("generator"))
    assert tls.files_of(config).mutual


def envoy_serials(admin_port: int) -> set[int]:
    """The serial numbers of the certificates Envoy holds now (its admin /certs)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/certs", timeout=5) as reply:
        certs = json.loads(reply.read())["certificates"]
    return {
        int(item["serial_number"], 16)
        for entry in certs
        for item in entry.get("cert_chain", []) + entry.get("ca_cert", [])
    }


def test_envoy_rereads_its_upstream_client_certificate(mtls_stack: MtlsStack, pki: Pki) -> None:
    old = pki.tiers["envoy"]
    assert old.serial in envoy_serials(mtls_stack.envoy_admin_port)
    folder = pki.folder / "renewed-envoy"
    folder.mkdir(exist_ok=True)
    renewed = issue(pki.ca, folder, "envoy")
    os.replace(renewed.key, old.key)
    os.replace(renewed.cert, old.cert)
    deadline = time.monotonic() + 20
    while renewed.serial not in (serials := envoy_serials(mtls_stack.envoy_admin_port)):
        assert time.monotonic() < deadline, f"Envoy still holds {serials}, not {renewed.serial}"
        time.sleep(0.25)
    assert old.serial not in serials
    status, reply = post(mtls_stack.envoy_url + "/embeddings", {"input": ["renewed"]})
    assert status == 200, reply


def test_a_half_done_renewal_keeps_the_current_certificate(pki: Pki, tmp_path: Path) -> None:
    first = issue(pki.ca, tmp_path, "server")
    reloader = tls.CertificateReloader(tls.TlsFiles(str(pki.ca.path), str(first.cert), str(first.key)))
    assert reloader() is None
    renewed_folder = tmp_path / "renewed"
    renewed_folder.mkdir()
    renewed = issue(pki.ca, renewed_folder, "server")
    # The new key beside the old certificate: not a pair, so no change yet.
    os.replace(renewed.key, first.key)
    assert reloader() is None and reloader.reloads == 0
    os.replace(renewed.cert, first.cert)
    assert reloader() is not None and reloader.reloads == 1
    assert reloader() is None


# -- a renewed client certificate, as a backend sees it --------------------------------------------


class PeerRecorder:
    """A generator stand-in on mutual TLS that answers health (SERVING) and notes the serial of
    the client certificate of every Generate call (then refuses it)."""

    def __init__(self, files: tls.TlsFiles) -> None:
        self.serials: list[int] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        handler = grpc.unary_unary_rpc_method_handler(
            self._generate,
            request_deserializer=generation_pb2.GenerateRequest.FromString,
            response_serializer=generation_pb2.GenerateResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.v1.GenerationService", {"Generate": handler}),)
        )
        port = self.server.add_secure_port("127.0.0.1:0", tls.server_credentials(files))
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def _generate(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext) -> None:
        # grpc gives each property as a list of bytes (its stub says bytes).
        pems: list[bytes] = list(context.auth_context().get("x509_pem_cert") or [])  # type: ignore[arg-type]
        self.serials.append(int(x509.load_pem_x509_certificate(pems[0]).serial_number))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recorded")


def test_the_gateway_presents_a_renewed_client_certificate_without_a_restart(
    pki: Pki, tmp_path: Path
) -> None:
    backend = PeerRecorder(pki.files("generator"))
    own = issue(pki.ca, tmp_path, "gateway")
    gateway = None
    try:
        port = free_port()
        gateway = ServiceProcess.python_module(
            "gateway-renewal",
            "services.gateway",
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
            *("--tls-ca", str(pki.ca.path), "--tls-cert", str(own.cert), "--tls-key", str(own.key)),
            *("--generator-addresses", backend.address, "--embedder-addresses", backend.address),
        ).start()
        address = f"127.0.0.1:{port}"
        wait_serving(gateway, address, pki.files("client"), timeout=60)
        client = tls.channel(address, pki.files("client"))

        def generate() -> None:
            with pytest.raises(grpc.RpcError):
                generation_pb2_grpc.GenerationServiceStub(client).Generate(
                    generation_pb2.GenerateRequest(prompt="Hi"), timeout=10
                )

        generate()
        assert backend.serials and set(backend.serials) == {own.serial}
        pid = gateway.pid
        renewed_folder = tmp_path / "renewed"
        renewed_folder.mkdir()
        renewed = issue(pki.ca, renewed_folder, "gateway")
        os.replace(renewed.key, own.key)
        os.replace(renewed.cert, own.cert)
        deadline = time.monotonic() + 20
        while backend.serials[-1] != renewed.serial:
            assert time.monotonic() < deadline, f"the generator still sees {backend.serials[-1]}"
            time.sleep(0.5)
            generate()
        assert gateway.pid == pid and gateway.alive()
        client.close()
    finally:
        if gateway is not None:
            gateway.stop(grace=5)
        backend.server.stop(None)
