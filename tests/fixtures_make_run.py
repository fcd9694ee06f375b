"""One `make run` for the whole test session, on free ports, shared by every test file that takes
the `make_run` fixture (tests/test_make_run.py, tests/test_playground_browser.py): the models load
once. Those tests are run together, and the one marked `stops_make_run`, which stops it, last."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.stack import ROOT, free_port

READY = "The stack is SERVING"
PORT_VARIABLES = (
    "ENVOY_PORT",
    "ENVOY_ADMIN_PORT",
    "GATEWAY_PORT",
    "GATEWAY_METRICS_PORT",
    "GENERATOR_PORT",
    "GENERATOR_METRICS_PORT",
    "EMBEDDER_PORT",
    "EMBEDDER_METRICS_PORT",
    "PREDICTIONS_PORT",
    "PREDICTIONS_METRICS_PORT",
    "PLAYGROUND_PORT",
)


@dataclass
class RunningStack:
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int]
    descendants: list[psutil.Process] = field(default_factory=list)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


def clean_environment(extra: dict[str, str]) -> dict[str, str]:
    """The user's environment without any stack variable that would point elsewhere."""
    prefixes = ("GATEWAY_", "GENERATOR_", "EMBEDDER_", "PREDICTIONS_", "ENVOY_", "PLAYGROUND_", "STREAMLIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def kill_leftovers(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that use the shared stack one after the other (it is up only that long),
    from where the first of them was, and the one that stops it last."""
    users = [item for item in items if "make_run" in getattr(item, "fixturenames", ())]
    if not users:
        return
    stoppers = [item for item in users if item.get_closest_marker("stops_make_run")]
    users = [item for item in users if item not in stoppers] + stoppers
    at = items.index(users[0])
    rest = [item for item in items if item not in users]
    items[:] = [*rest[:at], *users, *rest[at:]]


@pytest.fixture(scope="session")
def make_run() -> Iterator[RunningStack]:
    """`make run` as a user runs it, SERVING on free ports; SIGTERM (then SIGKILL) at the end."""
    ports = {name: free_port() for name in PORT_VARIABLES}
    log_path = Path(tempfile.mkdtemp(prefix="make-run-")) / "make-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT,
            env=clean_environment({name: str(port) for name, port in ports.items()}),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    running = RunningStack(process, log_path, ports)
    try:
        # The first `make run` on a machine installs everything; later ones only load models.
        deadline = time.monotonic() + 900
        while READY not in running.output():
            if process.poll() is not None:
                pytest.fail(f"make run exited with {process.returncode} before SERVING:\n{running.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"make run not SERVING after 900 s:\n{running.tail()}")
            time.sleep(0.5)
        running.descendants = psutil.Process(process.pid).children(recursive=True)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        kill_leftovers(running.descendants)
