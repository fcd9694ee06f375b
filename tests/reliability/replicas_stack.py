"""Model-tier replicas that a test can kill and start again on the same ports, and what their
metrics say they served: two generators and two embedders fit on two cores with one thread each."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.stack import Sample, ServiceProcess, free_port, health_status, metric_samples

# One runtime thread each and small batches: four model processes share two cores.
GENERATOR_ARGS = ("--threads", "1", "--max-running-sequences", "8", "--prefix-cache-mib", "16")
EMBEDDER_ARGS = ("--torch-threads", "1", "--max-models", "1")

KINDS = {
    "generator": ("services.generator", GENERATOR_ARGS),
    "embedder": ("services.embedder", EMBEDDER_ARGS),
}


def _admitted_generator(samples: list[Sample]) -> float:
    # Prompt tokens are counted when a request is admitted to the batch, not when it ends: a long
    # stream shows up at once.
    return sum(value for name, _, value in samples if name == "generator_prompt_tokens_total")


def _embed_calls(samples: list[Sample]) -> float:
    return sum(
        value
        for name, labels, value in samples
        if name == "embedder_requests_total" and labels.get("method") == "Embed"
    )


# How much work a replica took on so far, from its own metrics.
SERVED: dict[str, Callable[[list[Sample]], float]] = {
    "generator": _admitted_generator,
    "embedder": _embed_calls,
}


@dataclass
class ModelReplica:
    """One generator or embedder process on fixed ports, which may be killed and started again."""

    kind: str
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: ServiceProcess | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ModelReplica:
        """Start the process (again) on the same ports; it does not wait for SERVING."""
        module, args = KINDS[self.kind]
        self.starts += 1
        self.process = ServiceProcess.python_module(
            f"{self.kind}-{self.port}-{self.starts}",
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *args,
            env={"HF_HUB_OFFLINE": "1"},
        ).start()
        return self

    def wait_until_serving(self, timeout: float = 150.0) -> float:
        """Poll health every 0.1 s; the monotonic time it first said SERVING."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"{self.kind} exited:\n{self.process.log_tail()}")
            if health_status(self.address, timeout=1.0) == "SERVING":
                return time.monotonic()
            time.sleep(0.1)
        raise TimeoutError(f"{self.kind} at {self.address} not SERVING:\n{self.process.log_tail()}")

    def served(self) -> float:
        """The work it took on so far (see SERVED); 0 while its metrics cannot be read."""
        try:
            return SERVED[self.kind](metric_samples(self.metrics_port, timeout=5))
        except OSError:
            return 0.0

    def running(self) -> float:
        """A generator's sequences in its running batch now (0 while its metrics cannot be read)."""
        try:
            samples = metric_samples(self.metrics_port, timeout=5)
        except OSError:
            return 0.0
        return sum(value for name, _, value in samples if name == "generator_running_sequences")

    def kill(self) -> None:
        assert self.process is not None and self.process.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=5)
