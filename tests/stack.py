"""Start the project's real services as their own processes for tests, and stop them.

Every end-to-end fixture goes through `ServiceProcess`, so that each server runs in its own
process (as in production), its log lands in a file that is shown when it fails to come up, and
nothing outlives the test session.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on, not handed out before in this session, and below the kernel's
    ephemeral range: a port picked there (bind to 0) can become some outgoing connection's local
    port before the service binds it ("Address already in use", seen once in CI)."""
    top = _ephemeral_start()
    for _ in range(200):
        port = random.randrange(max(1024, top - 12000), top)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        fallback: int = sock.getsockname()[1]
        return fallback


Sample = tuple[str, dict[str, str], float]


def metric_samples(port: int, timeout: float = 30.0) -> list[Sample]:
    """Every sample of the Prometheus endpoint on 127.0.0.1:`port`: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The grpc.health.v1 status name of `service` at `address`, or "UNREACHABLE"."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name


class ServiceProcess:
    """One service in its own process, logging to a file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        log_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def python_module(
        cls, name: str, module: str, *args: str, env: Mapping[str, str] | None = None
    ) -> ServiceProcess:
        return cls(name, [sys.executable, "-m", module, *args], env=env)

    def start(self) -> ServiceProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until_serving(self, address: str, service: str = "", timeout: float = 240.0) -> None:
        """Wait until grpc.health.v1 reports SERVING; fail with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.process and self.process.returncode}:\n{self.log_tail()}"
                )
            status = health_status(address, service)
            if status == "SERVING":
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"{self.name} at {address} still {status} after {timeout:.0f}s:\n{self.log_tail()}"
        )

    def wait_until_port_open(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not open port {port}:\n{self.log_tail()}")

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.process is None:
            return None
        if self.alive():
            self.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode


def sigterm_while_loading(
    name: str, module: str, env: Mapping[str, str] | None = None
) -> tuple[float, int, str]:
    """Start `module` on a free port, send SIGTERM as soon as it listens (its model still
    loading: the health status must still be NOT_SERVING), and return the seconds it took to
    exit, its exit code and its log tail."""
    port = free_port()
    process = ServiceProcess.python_module(
        name, module, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", env=env
    ).start()
    try:
        process.wait_until_port_open(port, timeout=120)
        status = health_status(f"127.0.0.1:{port}")
        assert status == "NOT_SERVING", f"{name} was {status} before the signal, not loading"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.process is not None
        code = process.process.wait(timeout=120)
        return time.monotonic() - signalled, code, process.log_tail()
    finally:
        process.stop()
