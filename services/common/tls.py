"""TLS and mutual TLS between the tiers, with grpc's own credentials.

Every service takes `tls_ca`, `tls_cert` and `tls_key` (PEM files; all empty: plaintext). With a
certificate and key a server serves TLS; with a CA as well it requires client certificates signed
by that CA. A server rereads the files when they change (checked at each new connection), so a
renewed certificate is served without a restart. Clients (the gateway's backend channels, the
predictions service's gateway channel, the health check) use TLS when a CA is set, verifying the
server against it and presenting their own certificate and key: one certificate per service, for
both directions. Client channels read the files once: renewing a client certificate needs a
(rolling) restart of that client.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger("services.common.tls")


@dataclass(frozen=True)
class TlsFiles:
    """The three PEM files of one service; empty strings where unset."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def serves_tls(self) -> bool:
        """A server with these files serves TLS."""
        return bool(self.cert and self.key)

    @property
    def mutual(self) -> bool:
        """A server with these files requires client certificates signed by the CA."""
        return self.serves_tls and bool(self.ca)

    @property
    def client_tls(self) -> bool:
        """A client with these files connects with TLS."""
        return bool(self.ca)


PLAINTEXT = TlsFiles()


def files_of(config: Any) -> TlsFiles:
    """The TlsFiles of a service configuration (its tls_ca, tls_cert and tls_key fields)."""
    return TlsFiles(config.tls_ca, config.tls_cert, config.tls_key)


def check_files(prefix: str, ca: str, cert: str, key: str) -> None:
    """Raises ValueError naming the setting when the files do not make a usable configuration."""
    names = {"tls_ca": ca, "tls_cert": cert, "tls_key": key}
    if bool(cert) != bool(key):
        given, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
        raise ValueError(
            f"--{given.replace('_', '-')} ({prefix}_{given.upper()}) needs "
            f"--{missing.replace('_', '-')} ({prefix}_{missing.upper()}) too"
        )
    for name, path in names.items():
        if path and not os.path.isfile(path):
            raise ValueError(f"--{name.replace('_', '-')} ({prefix}_{name.upper()}): no such file {path!r}")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _stamp(paths: Sequence[str]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append((0, 0))
            continue
        stamps.append((stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


class CertificateReloader:
    """grpc's certificate-configuration fetcher: a new configuration when a file changed since the
    last one (mtime or size), None (keep the current one) otherwise or when the new files do not
    load (a half-written renewal is retried at the next connection)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._paths = [path for path in (files.cert, files.key, files.ca) if path]
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.reloads = 0
        self.initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        # grpc takes any PEM here and fails the handshakes later: a renewal caught between its
        # key and its certificate (a mismatched pair) must be refused now, and retried.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.files.cert, self.files.key)
        ca = _read(self.files.ca) if self.files.ca else None
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.files.key), _read(self.files.cert))], root_certificates=ca
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = _stamp(self._paths)
            if stamp == self._stamp:
                return None
            try:
                configuration = self._configuration()
            except Exception as error:  # grpc raises several types for a bad PEM
                log.warning("TLS files changed but do not load yet (%s); keeping the current ones", error)
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.files.cert)
            return configuration


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that serve `files` (rereading them when they change); client certificates
    signed by the CA are required when a CA is set."""
    reloader = CertificateReloader(files)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial,
        # The stub omits the None ("keep the current configuration") that grpc documents.
        reloader,  # type: ignore[arg-type]
        require_client_authentication=files.mutual,
    )


def add_port(server: grpc.aio.Server, address: str, files: TlsFiles) -> int:
    """Listens on `address` with TLS when `files` has a certificate, in plaintext otherwise."""
    if not files.serves_tls:
        return server.add_insecure_port(address)
    port = server.add_secure_port(address, server_credentials(files))
    log.info("%s on %s", "mutual TLS" if files.mutual else "TLS", address)
    return port


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """The server is verified against the CA; the client presents its certificate where set."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca) if files.ca else None,
        private_key=_read(files.key) if files.key else None,
        certificate_chain=_read(files.cert) if files.cert else None,
    )


def aio_channel(
    target: str,
    files: TlsFiles,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[Any] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: TLS with `files` when it has a CA, plaintext otherwise."""
    if files.client_tls:
        return grpc.aio.secure_channel(
            target, channel_credentials(files), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def channel(target: str, files: TlsFiles, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel to `target`: TLS with `files` when it has a CA, plaintext otherwise."""
    if files.client_tls:
        return grpc.secure_channel(target, channel_credentials(files), options=options)
    return grpc.insecure_channel(target, options=options)


def env_files(environ: Mapping[str, str], prefix: str) -> TlsFiles:
    """The TlsFiles `<PREFIX>_TLS_CA`, `_CERT` and `_KEY` name in an environment."""
    return TlsFiles(
        environ.get(f"{prefix}_TLS_CA", ""),
        environ.get(f"{prefix}_TLS_CERT", ""),
        environ.get(f"{prefix}_TLS_KEY", ""),
    )


# The help of the tls_* fields every service configuration has (appended to each dataclass).
CA_HELP = (
    "PEM file of the CA for mutual TLS between tiers: with --tls-cert a client certificate signed "
    "by it is required; as a client, servers are verified against it (empty: plaintext)"
)
CERT_HELP = (
    "PEM certificate (chain) this service serves with TLS and presents as a client; reread when "
    "the file changes (empty: plaintext)"
)
KEY_HELP = "PEM private key of --tls-cert"
