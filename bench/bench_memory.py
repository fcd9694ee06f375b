"""Memory after load, round by round: the stack (generator, embedder, gateway, Envoy) takes the
same load several times and each tier's resident size is read after every round. Growth that
stops after the first rounds is a cache filling to its bound; growth every round is a leak.

    .venv/bin/python bench/bench_memory.py                      # 4 rounds
    .venv/bin/python bench/bench_memory.py --rounds 6 --streams 300
    MALLOC_ARENA_MAX=2 .venv/bin/python bench/bench_memory.py  # the Python tiers with 2 arenas

One round: `--bodies` requests with a 10 MB body through Envoy (refused, as the probes of issue 21
sent them), a burst of `--streams` concurrent chat streams through the gateway (the waiting queue
overflows: some are refused), then `--probes` unary chats with distinct prompts (each a new entry
of the gateway's response cache) and as many embedding calls. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc.aio
import httpx2
import psutil
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fixtures_embedder import start_embedder  # noqa: E402
from tests.fixtures_gateway import (  # noqa: E402
    GatewayService,
    descriptor_for_envoy,
    start_envoy,
    start_gateway,
    write_key_file,
)
from tests.fixtures_generator import start_generator  # noqa: E402
from tests.stack import ServiceProcess  # noqa: E402


def mib(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


async def burst(
    address: str, metadata: tuple[tuple[str, str], ...], streams: int, tokens: int
) -> tuple[int, int]:
    """`streams` concurrent chat streams; (completed, refused)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one(index: int) -> bool:
            request = generation_pb2.ChatRequest(
                messages=[common_pb2.ChatMessage(role="user", content=f"Tell me story number {index}.")],
                parameters=common_pb2.SamplingParameters(max_new_tokens=tokens, temperature=0.8),
            )
            try:
                async for _ in stub.ChatStream(request, metadata=metadata, timeout=600):
                    pass
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return False
            return True

        results = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(results), streams - sum(results)


def big_bodies(url: str, headers: dict[str, str], count: int) -> list[int]:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * 10_000_000 + b'"}]}'
    with httpx2.Client(base_url=url, headers=headers, timeout=120) as client:

        def send(_: int) -> int:
            return client.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            ).status_code

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(send, range(count)))


def probes(url: str, headers: dict[str, str], model: str, embedder: str, count: int, round_: int) -> None:
    with httpx2.Client(base_url=url, headers=headers, timeout=120) as client:

        def send(index: int) -> None:
            text = f"Round {round_} probe {index}: name a colour."
            chat = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
            assert client.post("/v1/chat/completions", json={**chat, "temperature": 0}).status_code == 200
            assert client.post("/v1/embeddings", json={"model": embedder, "input": [text]}).status_code == 200

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(count)))


def envoy_heap(admin_port: int) -> tuple[float, float]:
    """(allocated, heap size) of Envoy's allocator in MiB, from its admin /memory: what is in use,
    and what the allocator holds from the system (in use plus freed pages it keeps)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/memory", timeout=30) as reply:
        memory = json.load(reply)
    return int(memory["allocated"]) / 2**20, int(memory["heap_size"]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bodies", type=int, default=20, help="10 MB bodies per round")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams per round")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens of each stream")
    parser.add_argument("--probes", type=int, default=300, help="unary chats and embeddings per round")
    args = parser.parse_args()
    # A SIGTERM (timeout, a killed run) still stops the services below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started: list[ServiceProcess] = []
    try:
        generator = start_generator()
        started.append(generator.process)
        embedder = start_embedder()
        started.append(embedder.process)
        workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        keys_file = workdir / "keys.json"
        keys = write_key_file(keys_file)
        process, address, metrics = start_gateway(
            generator.address, embedder.address, ("--api-keys-file", str(keys_file))
        )
        started.append(process)
        gateway = GatewayService(address, metrics, process, keys, keys_file)
        envoy = start_envoy(address, workdir, name="bench-envoy", descriptor=descriptor_for_envoy())
        started.append(envoy.process)
        tiers = {
            "envoy": envoy.process,
            "gateway": process,
            "generator": generator.process,
            "embedder": embedder.process,
        }
        watched = {name: psutil.Process(p.pid) for name, p in tiers.items()}
        headers = gateway.headers("user")
        with httpx2.Client(base_url=envoy.url, headers=headers, timeout=60) as client:
            served = {m["task"]: m["id"] for m in client.get("/models").json()["models"]}
        print(f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', '(unset)')}")
        print("round " + " ".join(f"{name:>10}" for name in watched) + "   (RSS MiB after the round)")
        allocated, heap = envoy_heap(envoy.admin_port)
        print(
            "start "
            + " ".join(f"{mib(p):10.1f}" for p in watched.values())
            + f"   envoy allocated {allocated:.1f}, heap {heap:.1f}"
        )
        for round_ in range(1, args.rounds + 1):
            began = time.monotonic()
            codes = big_bodies(envoy.url, headers, args.bodies)
            done, refused = asyncio.run(burst(address, gateway.metadata("user"), args.streams, args.tokens))
            probes(envoy.url, headers, served["generation"], served["embedding"], args.probes, round_)
            time.sleep(5)
            allocated, heap = envoy_heap(envoy.admin_port)
            print(
                f"{round_:5d} "
                + " ".join(f"{mib(p):10.1f}" for p in watched.values())
                + f"   envoy allocated {allocated:.1f}, heap {heap:.1f};"
                + f" bodies {sorted(set(codes))}, streams {done} done {refused} refused,"
                f" {time.monotonic() - began:.0f} s"
            )
    finally:
        for service in reversed(started):
            service.stop()


if __name__ == "__main__":
    main()
