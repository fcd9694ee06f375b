"""TLS and mutual TLS between the tiers, with grpc's own credentials.

Every service takes `tls_ca`, `tls_cert` and `tls_key` (PEM files; all empty: plaintext). With a
certificate and key a server serves TLS; with a CA as well it requires client certificates signed
by that CA. A server rereads the files when they change (checked at each new connection), so a
renewed certificate is served without a restart. Clients (the gateway's backend channels, the
predictions service's gateway channel, the health check) use TLS when a CA is set, verifying the
server against it and presenting their own certificate and key: one certificate per service, for
both directions. Client channels (ReloadingChannel) are rebuilt when their files change; the old
channel is closed after a grace so that calls in flight finish. The health check of a TLS server
without a CA verifies it against the server's own certificate (self_check_files).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    if ca and not cert:
        # Without a certificate the server would listen in plaintext, the CA silently unused.
        raise ValueError(
            f"--tls-ca ({prefix}_TLS_CA) needs --tls-cert ({prefix}_TLS_CERT) and --tls-key "
            f"({prefix}_TLS_KEY): a server with a CA alone would listen in plaintext"
        )


def self_check_files(files: TlsFiles) -> TlsFiles:
    """The files a health check of the server owning `files` connects with: as they are when they
    hold a CA; for a TLS server without one, TLS verified against the server's own certificate
    (self-signed, or a chain file that ends in its CA), presenting nothing."""
    if files.ca or not files.serves_tls:
        return files
    return TlsFiles(ca=files.cert)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _stamp(paths: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    # The inode too: a renewal renamed into place within the same clock tick is still seen.
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
            continue
        stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


@dataclass(frozen=True)
class Loaded:
    """The bytes of a TlsFiles, read once and checked to be a usable pair."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None


def _check_pair(cert: bytes, key: bytes) -> None:
    # ssl loads a pair only from paths: an anonymous in-memory file gives it these very bytes
    # (grpc takes any PEM and fails the handshakes later, so a mismatched pair is refused here).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:  # not Linux: a private temporary file
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "cert.pem").write_bytes(cert)
            Path(folder, "key.pem").write_bytes(key)
            context.load_cert_chain(str(Path(folder, "cert.pem")), str(Path(folder, "key.pem")))
        return
    descriptors = [memfd_create("tls-cert"), memfd_create("tls-key")]
    try:
        for descriptor, data in zip(descriptors, (cert, key), strict=True):
            os.write(descriptor, data)
        context.load_cert_chain(*(f"/proc/self/fd/{descriptor}" for descriptor in descriptors))
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def load(files: TlsFiles) -> Loaded:
    """Each file read once; a certificate and key that are not a pair raise (ssl.SSLError,
    OSError or ValueError)."""
    cert = _read(files.cert) if files.cert else None
    key = _read(files.key) if files.key else None
    if cert is not None and key is not None:
        _check_pair(cert, key)
    return Loaded(_read(files.ca) if files.ca else None, cert, key)


class FileWatch:
    """Tells when `files` changed (mtime or size) since the last usable load, and loads them; a
    change that does not load is logged once, then retried silently until the files change again."""

    def __init__(self, files: TlsFiles, what: str) -> None:
        self.files = files
        self.what = what
        self._paths = [path for path in (files.cert, files.key, files.ca) if path]
        self._stamp = _stamp(self._paths)
        self._failed: tuple[tuple[int, int, int], ...] | None = None
        self.failures = 0

    def reload(self) -> Loaded | None:
        """The new files when they changed and load; None otherwise (keep the current ones)."""
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            return None
        try:
            loaded = load(self.files)
        except Exception as error:  # grpc and ssl raise several types for a bad PEM
            if stamp != self._failed:
                self._failed = stamp
                self.failures += 1
                log.warning(
                    "%s: TLS files changed but do not load (%s); keeping the current ones", self.what, error
                )
            return None
        self._stamp, self._failed = stamp, None
        return loaded


class CertificateReloader:
    """grpc's certificate-configuration fetcher: a new configuration when a file changed since the
    last one (mtime or size), None (keep the current one) otherwise or when the new files do not
    load (a half-written renewal is retried at the next connection, and logged once)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._watch = FileWatch(files, "server")
        self.reloads = 0
        self.initial = self._configuration(load(files))

    @property
    def failures(self) -> int:
        """How many changes of the files did not load (each counted, and logged, once)."""
        return self._watch.failures

    def _configuration(self, loaded: Loaded) -> grpc.ServerCertificateConfiguration:
        assert loaded.cert is not None and loaded.key is not None
        return grpc.ssl_server_certificate_configuration(
            [(loaded.key, loaded.cert)], root_certificates=loaded.ca
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            loaded = self._watch.reload()
            if loaded is None:
                return None
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.files.cert)
            return self._configuration(loaded)


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


def channel_credentials(files: TlsFiles, loaded: Loaded | None = None) -> grpc.ChannelCredentials:
    """The server is verified against the CA; the client presents its certificate where set
    (`loaded`: the files' bytes, read already)."""
    loaded = loaded or load(files)
    return grpc.ssl_channel_credentials(
        root_certificates=loaded.ca, private_key=loaded.key, certificate_chain=loaded.cert
    )


def aio_channel(
    target: str,
    files: TlsFiles,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[Any] | None = None,
    loaded: Loaded | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: TLS with `files` (or their bytes, `loaded`) when it has a
    CA, plaintext otherwise."""
    if files.client_tls:
        return grpc.aio.secure_channel(
            target, channel_credentials(files, loaded), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def channel(target: str, files: TlsFiles, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel to `target`: TLS with `files` when it has a CA, plaintext otherwise."""
    if files.client_tls:
        return grpc.secure_channel(target, channel_credentials(files), options=options)
    return grpc.insecure_channel(target, options=options)


# How long a replaced client channel stays open for the calls still on it (a generation stream
# runs for minutes at most; the tiers' own shutdown graces are 25-30 s).
RELOAD_GRACE_S = 120.0
# Client files are checked at most this often (on a call), so renewals cost one stat a second.
RELOAD_CHECK_S = 1.0


class ReloadingChannel:
    """An asyncio client channel made by `make` (from the files' bytes) and made again when
    `files` change, checked at most every RELOAD_CHECK_S on `current()`; the replaced channel
    is closed after `grace` seconds, so calls in flight on it finish."""

    def __init__(
        self,
        make: Callable[[Loaded | None], grpc.aio.Channel],
        files: TlsFiles,
        what: str,
        grace: float = RELOAD_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self._watch = FileWatch(files, what) if files.client_tls else None
        self._grace = grace
        self._clock = clock
        self._checked = clock()
        self._closing: set[asyncio.Task[None]] = set()
        self._old: set[grpc.aio.Channel] = set()
        self.what = what
        self.reloads = 0
        self.channel = make(load(files) if files.client_tls else None)

    def current(self) -> grpc.aio.Channel:
        """The channel to use now (a new one after the files changed)."""
        now = self._clock()
        if self._watch is None or now - self._checked < RELOAD_CHECK_S:
            return self.channel
        try:
            loop = asyncio.get_running_loop()  # the old channel is closed in it
        except RuntimeError:
            return self.channel
        self._checked = now
        loaded = self._watch.reload()
        if loaded is not None:
            old, self.channel = self.channel, self._make(loaded)
            self.reloads += 1
            log.info("%s: client certificate reloaded from %s", self.what, self._watch.files.cert or "-")
            self._old.add(old)
            task = loop.create_task(old.close(grace=self._grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            task.add_done_callback(functools.partial(_forget, self._old, old))
        return self.channel

    @classmethod
    def to(
        cls, target: str, files: TlsFiles, what: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> ReloadingChannel:
        """A reloading aio_channel to `target`."""
        return cls(lambda loaded: aio_channel(target, files, options=options, loaded=loaded), files, what)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for channel in [*self._old, self.channel]:
            await channel.close()


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


def _forget(channels: set[grpc.aio.Channel], channel: grpc.aio.Channel, _: object) -> None:
    channels.discard(channel)
