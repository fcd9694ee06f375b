"""Session fixtures for the generator tier (real process over loopback)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
import pytest
from inference.v1 import generation_pb2_grpc

from tests.stack import ServiceProcess, free_port


@dataclass
class GeneratorService:
    """A running generator: its gRPC address, metrics port and process."""

    address: str
    metrics_port: int
    process: ServiceProcess

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, grace: float = 15.0) -> int | None:
        return self.process.stop(grace)


def start_generator(
    extra_args: list[str] | None = None, env: Mapping[str, str] | None = None, timeout: float = 240.0
) -> GeneratorService:
    """Start `python -m services.generator` (default model) on free ports; wait until SERVING."""
    port, metrics_port = free_port(), free_port()
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *(extra_args or []),
    ]
    process = ServiceProcess.python_module(
        "generator", "services.generator", *args, env={"HF_HUB_OFFLINE": "1", **(env or {})}
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        process.wait_until_serving(address, timeout=timeout)
    except BaseException:
        process.stop(grace=5)
        raise
    return GeneratorService(address, metrics_port, process)


@pytest.fixture(scope="session")
def generator_service() -> Iterator[GeneratorService]:
    service = start_generator()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def generator_address(generator_service: GeneratorService) -> str:
    return generator_service.address


@pytest.fixture(scope="session")
def generator_stub(generator_address: str) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(generator_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)
