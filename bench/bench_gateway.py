"""Gateway and Envoy overhead, measured in one run (ratios, not absolute numbers).

1. Unary latency: GetModelCounter (trivial backend work) straight to the embedder over gRPC,
   through the gateway over gRPC, and as REST through Envoy and the gateway. Target: REST p50
   overhead over the direct call at most 2 ms.
2. Streaming: aggregate tokens/s of N concurrent greedy streams (default 16 and 32) as REST SSE
   through Envoy and the gateway, against the same streams over gRPC straight to the generator.
   Target: at least 0.95x. Also the same streams over gRPC through the gateway (its own cost
   without Envoy and SSE). For a stack it starts, also the CPU seconds each process (envoy,
   gateway, generator) spent per 1000 tokens on each path, from psutil: on a small machine the
   edge's CPU is taken from the generator's decoding, so that is where the ratio goes.

The REST side uses a minimal HTTP/1.1 keep-alive client on asyncio streams (`RawHttp`), not
httpx: on a 2-core machine httpx's own Python work per request (about 2.5 ms here) is larger than
the overhead being measured, while the gRPC side's client is C-core. `--httpx` measures with httpx.

Uses a running stack when given its addresses; otherwise starts generator, embedder, gateway
and Envoy on free ports (the test helpers) and stops them at the end:

    .venv/bin/python bench/bench_gateway.py --requests 300 --streams 16,32 --tokens 32
    .venv/bin/python bench/bench_gateway.py --envoy-url http://127.0.0.1:8080 \
        --gateway 127.0.0.1:50051 --generator 127.0.0.1:50052 --embedder 127.0.0.1:50053
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import httpx2
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.v1 import (  # noqa: E402
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

PROMPT = "Tell me about the history of Paris."


# HTTP chunks and SSE events the REST client read: several events in one chunk were coalesced.
SSE_COUNTS = {"chunks": 0, "events": 0}


class RawHttp:
    """One keep-alive HTTP/1.1 connection: GET with a Content-Length reply, POST with a chunked
    server-sent-events reply. Just enough for Envoy's replies; not a general client."""

    def __init__(self, url: str) -> None:
        self.host = url.split("//", 1)[1].rstrip("/")
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            host, port = self.host.rsplit(":", 1)
            self._streams = await asyncio.open_connection(host, int(port))
        return self._streams

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None

    @staticmethod
    def _status(head: bytes) -> int:
        return int(head.split(b" ", 2)[1])

    async def get(self, path: str) -> bytes:
        reader, writer = await self._open()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        if self._status(head) != 200:
            raise RuntimeError(f"GET {path}: {head.splitlines()[0]!r} {body[:200]!r}")
        return body

    async def events(self, path: str, body: dict[str, object]) -> AsyncIterator[bytes]:
        """The `data:` payloads of a chunked text/event-stream reply to a JSON POST."""
        reader, writer = await self._open()
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if self._status(head) != 200 or b"chunked" not in head.lower():
            raise RuntimeError(f"POST {path}: {head!r}")
        pending = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
            SSE_COUNTS["chunks"] += 1
            pending += chunk
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                if event.startswith(b"data: "):
                    SSE_COUNTS["events"] += 1
                    yield event[6:]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def unary_latencies(args: argparse.Namespace, model: str) -> dict[str, list[float]]:
    request = embedding_pb2.GetModelCounterRequest(model=model)
    results: dict[str, list[float]] = {"direct gRPC (embedder)": [], "gateway gRPC": [], "Envoy REST": []}
    async with (
        grpc.aio.insecure_channel(args.embedder) as direct,
        grpc.aio.insecure_channel(args.gateway) as gw,
    ):
        stubs = {
            "direct gRPC (embedder)": embedding_pb2_grpc.EmbeddingServiceStub(direct),
            "gateway gRPC": embedding_pb2_grpc.EmbeddingServiceStub(gw),
        }
        async with httpx2.AsyncClient(base_url=args.envoy_url, timeout=30) as client:
            raw = RawHttp(args.envoy_url)

            async def rest() -> None:
                path = f"/embeddings/counter/{model}"
                if args.httpx:
                    (await client.get(path)).raise_for_status()
                else:
                    await raw.get(path)

            for _ in range(20):  # warm up connections and caches
                for stub in stubs.values():
                    await stub.GetModelCounter(request, timeout=10)
                await rest()
            for _ in range(args.requests):
                # Interleaved, so that load from elsewhere on the machine hits all paths alike.
                for name, stub in stubs.items():
                    started = time.perf_counter()
                    await stub.GetModelCounter(request, timeout=10)
                    results[name].append(time.perf_counter() - started)
                started = time.perf_counter()
                await rest()
                results["Envoy REST"].append(time.perf_counter() - started)
            await raw.close()
    return results


async def grpc_streams(address: str, count: int, tokens: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one() -> int:
            request = generation_pb2.GenerateStreamRequest(
                messages=[common_pb2.ChatMessage(role="user", content=PROMPT)],
                parameters=common_pb2.SamplingParameters(max_new_tokens=tokens, do_sample=False),
            )
            produced = 0
            async for message in stub.GenerateStream(request, timeout=600):
                if message.HasField("usage"):
                    produced = message.usage.completion_tokens
            return produced

        started = time.perf_counter()
        produced = await asyncio.gather(*(one() for _ in range(count)))
        return sum(produced), time.perf_counter() - started


async def rest_streams(url: str, count: int, tokens: int, use_httpx: bool) -> tuple[int, float]:
    if not use_httpx:
        return await raw_rest_streams(url, count, tokens)
    limits = httpx2.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    async with httpx2.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one() -> int:
            body = {
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": True,
                "parameters": {"max_new_tokens": tokens, "do_sample": False},
            }
            produced = 0
            async with client.stream("POST", "/generate", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "usage" in event:
                            produced = event["usage"]["completion_tokens"]
                        if event.get("error"):
                            raise RuntimeError(event["error"])
            return produced

        started = time.perf_counter()
        produced = await asyncio.gather(*(one() for _ in range(count)))
        return sum(produced), time.perf_counter() - started


async def raw_rest_streams(url: str, count: int, tokens: int) -> tuple[int, float]:
    async def one() -> int:
        body: dict[str, object] = {
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "parameters": {"max_new_tokens": tokens, "do_sample": False},
        }
        connection = RawHttp(url)
        produced = 0
        try:
            async for data in connection.events("/generate", body):
                # Like the gRPC side, which reads only the usage field: decode what is needed.
                if b'"usage"' in data or b'"error"' in data:
                    event = json.loads(data)
                    if event.get("error"):
                        raise RuntimeError(event["error"])
                    produced = event["usage"]["completion_tokens"]
        finally:
            await connection.close()
        return produced

    started = time.perf_counter()
    produced = await asyncio.gather(*(one() for _ in range(count)))
    return sum(produced), time.perf_counter() - started


class CpuMeter:
    """CPU seconds (user + system, children included) of named processes between two reads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}

    def read(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, process in self.processes.items():
            total = 0.0
            for one in (process, *process.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = one.cpu_times()
                    total += times.user + times.system
            totals[name] = total
        return totals


PIDS: dict[str, int] = {}


@contextlib.contextmanager
def own_stack(generator_args: list[str], baseline: str = "") -> Iterator[dict[str, str]]:
    from tests.fixtures_embedder import start_embedder
    from tests.fixtures_gateway import start_envoy, start_gateway
    from tests.fixtures_generator import start_generator
    from tests.stack import ServiceProcess, free_port

    generator = start_generator(generator_args)
    embedder = start_embedder()
    embedder_address = embedder.address
    gateway_process, gateway_address, _ = start_gateway(
        generator.address,
        embedder_address,
        ("--cache-size", "0", "--tracing", "false", "--metrics-port", "0"),
    )
    envoy = start_envoy(gateway_address, Path(tempfile.mkdtemp(prefix="bench-envoy-")))
    PIDS.update(envoy=envoy.process.pid, gateway=gateway_process.pid, generator=generator.process.pid)
    stack = {
        "envoy_url": envoy.url,
        "gateway": gateway_address,
        "generator": generator.address,
        "embedder": embedder_address,
    }
    extra: list[ServiceProcess] = []
    try:
        if baseline:
            # The same gateway flags, its code from the other checkout; Envoy rendered from this one.
            port = free_port()
            other = ServiceProcess(
                "baseline-gateway",
                [
                    *(sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port)),
                    *("--generator-addresses", generator.address, "--embedder-addresses", embedder_address),
                    *("--cache-size", "0", "--tracing", "false", "--metrics-port", "0"),
                ],
                env={"PYTHONPATH": f"{baseline}:{baseline}/clients/python/src", "HF_HUB_OFFLINE": "1"},
                cwd=Path(baseline),
            ).start()
            extra.append(other)
            other.wait_until_serving(f"127.0.0.1:{port}", timeout=120)
            other_envoy = start_envoy(f"127.0.0.1:{port}", Path(tempfile.mkdtemp(prefix="bench-envoy-")))
            extra.append(other_envoy.process)
            PIDS.update(baseline_envoy=other_envoy.process.pid, baseline_gateway=other.pid)
            stack["baseline_url"] = other_envoy.url
        yield stack
    finally:
        for process in reversed(extra):
            process.stop()
        envoy.process.stop()
        gateway_process.stop()
        embedder.process.stop()
        generator.stop()


async def compare_gateways(args: argparse.Namespace) -> None:
    """REST streams alternating between this checkout's gateway and the baseline's (same generator,
    an Envoy each): tokens/s and CPU seconds per 1000 tokens of each gateway and Envoy."""
    meter = CpuMeter(PIDS)
    urls = {"this": args.envoy_url, "baseline": args.baseline_url}
    for url in urls.values():
        await rest_streams(url, 4, 4, args.httpx)
    for count in args.streams:
        tokens_of, seconds_of = dict.fromkeys(urls, 0), dict.fromkeys(urls, 0.0)
        cpu_of: dict[str, dict[str, float]] = {name: {} for name in urls}
        for number in range(args.rounds * 2):
            for name in ("this", "baseline") if number % 2 == 0 else ("baseline", "this"):
                before = meter.read()
                tokens, seconds = await rest_streams(urls[name], count, args.tokens, args.httpx)
                after = meter.read()
                prefix = "" if name == "this" else "baseline_"
                for process in ("gateway", "envoy"):
                    spent = after[prefix + process] - before[prefix + process]
                    cpu_of[name][process] = cpu_of[name].get(process, 0.0) + spent
                tokens_of[name] += tokens
                seconds_of[name] += seconds
        for name in urls:
            shares = "  ".join(f"{p} {cpu * 1000 / tokens_of[name]:.3f}" for p, cpu in cpu_of[name].items())
            print(
                f"{count} REST streams x {args.tokens} tokens, {name:8s} gateway: "
                f"{tokens_of[name] / seconds_of[name]:6.1f} tok/s, CPU s per 1000 tokens: {shares}"
            )


async def run(args: argparse.Namespace) -> None:
    if getattr(args, "baseline_url", None):
        await compare_gateways(args)
        return
    async with grpc.aio.insecure_channel(args.embedder) as channel:
        served = await info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
            info_pb2.ListServedModelsRequest(), timeout=30
        )
    model = served.models[0].id
    latencies = await unary_latencies(args, model)
    direct = statistics.median(latencies["direct gRPC (embedder)"])
    print(f"unary GetModelCounter, {args.requests} calls per path (interleaved):")
    for name, values in latencies.items():
        p50, p90 = statistics.median(values), percentile(values, 0.9)
        print(
            f"  {name:24s} p50 {p50 * 1e3:6.2f} ms  p90 {p90 * 1e3:6.2f} ms  "
            f"p50 overhead {(p50 - direct) * 1e3:+.2f} ms"
        )
    meter = CpuMeter(PIDS) if PIDS else None
    paths: dict[str, tuple[str, Callable[[int], Awaitable[tuple[int, float]]]]] = {
        "direct": ("direct gRPC", lambda count: grpc_streams(args.generator, count, args.tokens)),
        "gateway": ("gateway gRPC", lambda count: grpc_streams(args.gateway, count, args.tokens)),
        "rest": (
            "REST via Envoy",
            lambda count: rest_streams(args.envoy_url, count, args.tokens, args.httpx),
        ),
    }
    for _, stream in paths.values():  # warm up: first calls, connections, the prefix cache
        await stream(4)
    ratios: list[str] = []
    for count in args.streams:
        tokens_of = dict.fromkeys(paths, 0)
        seconds_of = dict.fromkeys(paths, 0.0)
        cpu_of: dict[str, dict[str, float]] = {path: {} for path in paths}
        SSE_COUNTS.update(chunks=0, events=0)
        # ABBA order (A B C C B A), so that a drift in the machine's load hits every path alike.
        order = [*paths, *reversed(paths)] if args.abba else list(paths)
        for _ in range(args.rounds):
            for path in order:
                before = meter.read() if meter else {}
                tokens, seconds = await paths[path][1](count)
                if meter:
                    for name, value in meter.read().items():
                        cpu_of[path][name] = cpu_of[path].get(name, 0.0) + value - before[name]
                tokens_of[path] += tokens
                seconds_of[path] += seconds
        rate = {path: tokens_of[path] / seconds_of[path] for path in paths}
        print(
            f"{count} concurrent streams x {args.tokens} tokens: "
            + ", ".join(f"{label} {rate[path]:6.1f} tok/s" for path, (label, _) in paths.items())
            + f"; REST / direct {rate['rest'] / rate['direct']:.3f}x,"
            f" gateway gRPC / direct {rate['gateway'] / rate['direct']:.3f}x"
        )
        ratios.append(f"{count} streams {rate['rest'] / rate['direct']:.3f}x")
        if SSE_COUNTS["chunks"]:
            print(f"  REST: {SSE_COUNTS['events'] / SSE_COUNTS['chunks']:.2f} SSE events per HTTP chunk")
        for path, (label, _) in paths.items():
            if cpu_of[path]:
                shares = "  ".join(
                    f"{name} {seconds * 1000 / tokens_of[path]:.3f}" for name, seconds in cpu_of[path].items()
                )
                print(f"  CPU s per 1000 tokens, {label:14s}: {shares}")
    print("REST / direct gRPC: " + ", ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--envoy-url")
    parser.add_argument("--gateway")
    parser.add_argument("--generator")
    parser.add_argument("--embedder")
    parser.add_argument("--requests", type=int, default=300, help="unary calls per path")
    parser.add_argument("--streams", type=lambda text: [int(x) for x in text.split(",")], default=[16, 32])
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens per stream")
    parser.add_argument("--httpx", action="store_true", help="REST through httpx instead of RawHttp")
    parser.add_argument(
        "--generator-args", default="", help='more flags for the generator this run starts ("--threads 1")'
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="another checkout (a worktree of main): its gateway, on the same generator behind its own "
        "Envoy, against this one's, REST streams only",
    )
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds per stream count")
    parser.add_argument(
        "--no-abba", dest="abba", action="store_false", help="run each streaming path once instead of ABBA"
    )
    args = parser.parse_args()
    given = [args.envoy_url, args.gateway, args.generator, args.embedder]
    if all(given):
        asyncio.run(run(args))
        return
    if any(given):
        parser.error("give all of --envoy-url, --gateway, --generator and --embedder, or none")
    # A timeout's SIGTERM stops the stack this run started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with own_stack(args.generator_args.split(), args.baseline) as stack:
        for key, value in stack.items():
            setattr(args, key, value)
        print(f"started a stack: {stack}")
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
