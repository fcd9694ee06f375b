"""Replicas on one machine: one generator with every core against `GENERATOR_REPLICAS=2` (two
generators, each pinned to its share of the cores, its threads following), in one run.

Both stacks are started the way `make run` starts them (tools/run.py, with a Procfile of the
generator and the gateway only) and are up together; the idle one takes no CPU. For each count of
concurrent streams (default 16 and 32), N greedy gRPC streams of `--tokens` tokens each go through
each stack's gateway, in ABBA order so that a drift in the machine's load hits both alike; it
prints the aggregate tokens/s of each and the ratio two replicas / one. Goal: at least 0.9x.

    .venv/bin/python bench/bench_replicas.py --streams 16,32 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
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

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from honcho.environ import parse_procfile  # noqa: E402
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

from tests.fixtures_make_run import PORT_VARIABLES, READY, clean_environment  # noqa: E402
from tests.stack import free_port, metric_samples  # noqa: E402
from tools.run import REPLICA_PORT_STEP  # noqa: E402

PROMPT = "Tell me about the history of Paris."


@dataclass(frozen=True)
class Stack:
    """A generator-and-gateway stack started by tools/run.py."""

    gateway: str
    generators: list[str]
    generator_metrics: list[int]
    log: Path


@contextlib.contextmanager
def make_run(
    settings: Mapping[str, str], tiers: tuple[str, ...] = ("generator", "gateway")
) -> Iterator[Stack]:
    """tools/run.py with `tiers` of the Procfile on free ports and `settings` in its environment,
    until every tier is SERVING; SIGTERM at the end."""
    folder = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
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
    try:
        deadline = time.monotonic() + 600
        while READY not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"make run did not reach SERVING:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        count = int(settings.get("GENERATOR_REPLICAS", "1"))
        steps = [k * REPLICA_PORT_STEP for k in range(count)]
        yield Stack(
            f"127.0.0.1:{ports['GATEWAY_PORT']}",
            [f"127.0.0.1:{ports['GENERATOR_PORT'] + step}" for step in steps],
            [ports["GENERATOR_METRICS_PORT"] + step for step in steps],
            log,
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def counter(metrics_ports: list[int], name: str) -> float:
    """A counter summed over the processes serving metrics on `metrics_ports`."""
    return sum(value for port in metrics_ports for sample, _, value in metric_samples(port) if sample == name)


async def streams(address: str, count: int, tokens: int) -> tuple[int, float]:
    """`count` concurrent greedy streams through `address`, each its own prompt: (tokens, seconds)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one(n: int) -> int:
            request = generation_pb2.GenerateStreamRequest(
                messages=[common_pb2.ChatMessage(role="user", content=f"{n}. {PROMPT}")],
                parameters=common_pb2.SamplingParameters(max_new_tokens=tokens, do_sample=False),
            )
            produced = 0
            async for message in stub.GenerateStream(request, timeout=600):
                if message.HasField("usage"):
                    produced = message.usage.completion_tokens
            return produced

        started = time.perf_counter()
        produced = await asyncio.gather(*(one(n) for n in range(count)))
        return sum(produced), time.perf_counter() - started


async def measure(one: Stack, two: Stack, counts: list[int], tokens: int, abba: bool) -> None:
    await streams(one.gateway, 4, 8)
    await streams(two.gateway, 4, 8)
    for count in counts:
        totals = {"one": [0, 0.0], "two": [0, 0.0]}
        for name in ("one", "two", "two", "one")[: 4 if abba else 2]:
            made, seconds = await streams((one if name == "one" else two).gateway, count, tokens)
            totals[name][0] += made
            totals[name][1] += seconds
        rate_one, rate_two = (totals[k][0] / totals[k][1] for k in ("one", "two"))
        print(
            f"{count} concurrent streams x {tokens} tokens: one generator (all cores) {rate_one:6.1f} tok/s, "
            f"two replicas (one share each) {rate_two:6.1f} tok/s, ratio {rate_two / rate_one:.3f}x"
        )
    served = [counter([port], "generator_generated_tokens_total") for port in two.generator_metrics]
    print(f"tokens generated by each replica: {', '.join(f'{value:.0f}' for value in served)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=lambda text: [int(x) for x in text.split(",")], default=[16, 32])
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per stream")
    parser.add_argument("--no-abba", dest="abba", action="store_false", help="each stack once per count")
    args = parser.parse_args()
    # Round robin, whatever the gateway's default: the replicas share the streams evenly.
    policy = {"GATEWAY_ROUTING_POLICY": "round_robin"}
    with (
        make_run({"GENERATOR_REPLICAS": "1", **policy}) as one,
        make_run({"GENERATOR_REPLICAS": "2", **policy}) as two,
    ):
        print(f"one generator at {one.generators[0]}; two replicas at {', '.join(two.generators)}")
        for stack in (one, two):
            for line in stack.log.read_text().splitlines():
                if "model runtime threads" in line:
                    print("  " + line.strip())
        asyncio.run(measure(one, two, args.streams, args.tokens, args.abba))


if __name__ == "__main__":
    main()
