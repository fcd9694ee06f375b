"""`make run` (tools/run.py) with a few tiers of the Procfile on free ports, for the replica tests
and benches (tests/test_make_run_replicas.py, bench/bench_replicas.py, bench/bench_routing.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from honcho.environ import parse_procfile

from tests.fixtures_make_run import PORT_VARIABLES, READY, clean_environment
from tests.stack import ROOT, free_port, metric_samples
from tools.run import REPLICA_PORT_STEP, generator_models, replica_count


@dataclass(frozen=True)
class Stack:
    """A stack started by tools/run.py: its gateway, its generator processes and their metrics."""

    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    folder: Path
    gateway: str
    generators: list[str]
    generator_metrics: list[int]

    @property
    def log(self) -> Path:
        return self.folder / "make-run.log"


@contextlib.contextmanager
def make_run(
    settings: Mapping[str, str], tiers: tuple[str, ...] = ("generator", "gateway"), folder: Path | None = None
) -> Iterator[Stack]:
    """tools/run.py with `tiers` of the Procfile on free ports and `settings` in its environment,
    until every tier is SERVING; SIGTERM at the end (SIGKILL for anything left)."""
    folder = folder or Path(tempfile.mkdtemp(prefix="make-run-replicas-"))
    commands = parse_procfile((ROOT / "Procfile").read_text()).processes
    procfile = folder / "Procfile"
    procfile.write_text("".join(f"{name}:{commands[name]}\n" for name in tiers))
    ports = {name: free_port() for name in PORT_VARIABLES}
    env = clean_environment({name: str(port) for name, port in ports.items()})
    env.update(settings)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    log = folder / "make-run.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.run",
                "--procfile",
                str(procfile),
                "--run-dir",
                str(folder / "run"),
            ],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while READY not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"make run did not reach SERVING:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        descendants = psutil.Process(process.pid).children(recursive=True)
        count = replica_count(settings, "generator") * len(generator_models(settings))
        steps = [k * REPLICA_PORT_STEP for k in range(count)]
        yield Stack(
            process,
            ports,
            folder,
            f"127.0.0.1:{ports['GATEWAY_PORT']}",
            [f"127.0.0.1:{ports['GENERATOR_PORT'] + step}" for step in steps],
            [ports["GENERATOR_METRICS_PORT"] + step for step in steps],
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()


def counter(metrics_ports: list[int], name: str) -> float:
    """A counter summed over the processes serving metrics on `metrics_ports`."""
    return sum(value for port in metrics_ports for sample, _, value in metric_samples(port) if sample == name)
