"""Predictions overhead, measured in one run (ratios and differences, not absolute numbers).

1. Creation rate: N predictions created (no wait) with C at a time, REST through Envoy, against
   SQLite and against PostgreSQL (when its server binaries are installed). Each one also runs
   (a short greedy generation), as it would in production.
2. Added latency: a prediction created with `Prefer: wait=60` against a direct POST /generate of
   the same input (greedy, max_new_tokens 8), interleaved pair by pair; p50 and p90 of the
   difference. Goal: p50 under 20 ms.

The REST side uses bench_gateway's minimal keep-alive HTTP/1.1 client (`RawHttp`-style): on a
2-core machine httpx's own work per request would blur the differences being measured.

Starts generator, embedder, gateway, the predictions service and Envoy on free ports (the test
helpers) and stops them at the end:

    .venv/bin/python bench/bench_predictions.py --creates 200 --concurrency 16 --pairs 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from tests.fixtures_postgres import PostgresServer

PROMPT = "Tell me about the history of Paris."


class Http:
    """One keep-alive HTTP/1.1 connection for JSON requests with a Content-Length reply."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.host = url.split("//", 1)[1].rstrip("/")
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None

    async def call(self, method: str, path: str, body: Any | None = None, extra: str = "") -> tuple[int, Any]:
        if self._streams is None:
            host, port = self.host.rsplit(":", 1)
            self._streams = await asyncio.open_connection(host, int(port))
        reader, writer = self._streams
        payload = b"" if body is None else json.dumps(body).encode()
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return status, json.loads(await reader.readexactly(length))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def generation_input(tokens: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "parameters": {"max_new_tokens": tokens, "do_sample": False}}


async def creation_rate(
    url: str, headers: dict[str, str], model: str, count: int, concurrency: int
) -> tuple[float, int, list[str]]:
    """(predictions created per second, refusals, the ids) for `count` creates, `concurrency` at once."""
    queue = list(range(count))
    ids: list[str] = []
    refused = 0

    async def worker() -> None:
        nonlocal refused
        http = Http(url, headers)
        try:
            while queue:
                queue.pop()
                status, reply = await http.call(
                    "POST", "/v1/predictions", {"model": model, "input": generation_input(1)}
                )
                if status == 201:
                    ids.append(reply["id"])
                else:
                    refused += 1
        finally:
            await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(ids) / (time.perf_counter() - started), refused, ids


async def drain(url: str, headers: dict[str, str], ids: list[str], limit_s: float = 600) -> None:
    """Waits until every prediction in `ids` has ended, so that the next phase starts idle."""
    http = Http(url, headers)
    deadline = time.monotonic() + limit_s
    try:
        for prediction_id in ids:
            while True:
                _, reply = await http.call("GET", f"/v1/predictions/{prediction_id}")
                if reply["status"] in ("succeeded", "failed", "canceled"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{prediction_id} still {reply['status']}")
                await asyncio.sleep(0.2)
    finally:
        await http.close()


async def added_latency(
    url: str, headers: dict[str, str], model: str, pairs: int
) -> tuple[list[float], list[float]]:
    """Per pair, in seconds: the direct /generate, and (prediction with Prefer: wait) - direct."""
    http = Http(url, headers)
    directs: list[float] = []
    differences: list[float] = []
    try:
        for index in range(pairs + 5):
            started = time.perf_counter()
            status, direct = await http.call("POST", "/generate", generation_input(8))
            direct_seconds = time.perf_counter() - started
            assert status == 200, direct
            started = time.perf_counter()
            status, prediction = await http.call(
                "POST",
                "/v1/predictions",
                {"model": model, "input": generation_input(8)},
                extra="Prefer: wait=60\r\n",
            )
            waited_seconds = time.perf_counter() - started
            assert status == 201 and prediction["status"] == "succeeded", prediction
            assert prediction["output"]["generated_text"] == direct["generated_text"]
            if index >= 5:  # the first pairs warm connections and caches up
                directs.append(direct_seconds)
                differences.append(waited_seconds - direct_seconds)
    finally:
        await http.close()
    return directs, differences


async def measure(name: str, url: str, headers: dict[str, str], args: argparse.Namespace) -> None:
    http = Http(url, headers)
    _, served = await http.call("GET", "/models")
    await http.close()
    model = next(m["id"] for m in served["models"] if m["task"] == "generation")
    rate, refused, ids = await creation_rate(url, headers, model, args.creates, args.concurrency)
    print(
        f"[{name}] created {len(ids)} predictions ({args.concurrency} at a time): {rate:7.1f}/s"
        + (f", {refused} refused" if refused else "")
    )
    await drain(url, headers, ids)
    directs, differences = await added_latency(url, headers, model, args.pairs)
    p50, p90 = statistics.median(differences), percentile(differences, 0.9)
    print(
        f"[{name}] added latency of a prediction (Prefer: wait) over a direct /generate "
        f"(p50 {statistics.median(directs) * 1e3:.1f} ms), {args.pairs} pairs: "
        f"p50 {p50 * 1e3:+7.2f} ms  p90 {p90 * 1e3:+7.2f} ms  "
        f"({'meets' if p50 < 0.020 else 'misses'} the 20 ms p50 goal)"
    )


@contextlib.contextmanager
def own_stack(args: argparse.Namespace) -> Iterator[list[tuple[str, str, dict[str, str]]]]:
    """(backend name, Envoy URL, headers) for SQLite and, when available, PostgreSQL."""
    from tests.fixtures_embedder import start_embedder
    from tests.fixtures_gateway import GatewayService, start_gateway, write_key_file
    from tests.fixtures_generator import start_generator
    from tests.fixtures_predictions import sqlite_url, start_stack, stop_stack

    work = Path(tempfile.mkdtemp(prefix="bench-predictions-"))
    keys_file = work / "keys.json"
    keys = write_key_file(keys_file)
    with contextlib.ExitStack() as cleanup:
        generator = start_generator()
        cleanup.callback(generator.stop)
        embedder = start_embedder()
        cleanup.callback(embedder.process.stop)
        gateway_process, gateway_address, _ = start_gateway(
            generator.address,
            embedder.address,
            # No response cache: it would answer the direct /generate of a repeated greedy input
            # without generating, while a prediction's stream always generates.
            ("--api-keys-file", str(keys_file), "--cache-size", "0", "--tracing", "false"),
        )
        cleanup.callback(gateway_process.stop)
        gateway = GatewayService(gateway_address, 0, gateway_process, keys, keys_file)
        # The service's defaults, but no bound on waiting predictions: the rate is the point.
        flags = ("--max-waiting-per-key", "0", "--max-waiting-total", "0")
        databases = [("sqlite", sqlite_url(work))]
        if args.postgres:
            server = cleanup.enter_context(own_postgres())
            if server is not None:
                databases.append(("postgres", server.create_database("bench")))
        stacks = []
        for backend, database in databases:
            folder = work / backend
            folder.mkdir()
            stack = start_stack(backend, gateway, database, folder, flags, name=f"predictions-{backend}")
            cleanup.callback(stop_stack, stack)
            stacks.append((backend, stack.url, gateway.headers("user")))
        yield stacks
    shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def own_postgres() -> Iterator[PostgresServer | None]:
    """A PostgreSQL server of its own (the tests' fixture, outside pytest); None when the server
    binaries are not installed."""
    from tests import fixtures_postgres

    if fixtures_postgres.find_bin_dir() is None:
        print("PostgreSQL is not installed: measuring SQLite only")
        yield None
        return
    # The fixture's own generator: the same server the tests start.
    start = contextlib.contextmanager(inspect.unwrap(fixtures_postgres.postgres_server))
    with start() as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--creates", type=int, default=200, help="predictions created for the rate")
    parser.add_argument("--concurrency", type=int, default=16, help="creates in flight at once")
    parser.add_argument("--pairs", type=int, default=50, help="(prediction, /generate) pairs timed")
    parser.add_argument("--no-postgres", dest="postgres", action="store_false", help="measure SQLite only")
    args = parser.parse_args()
    with own_stack(args) as stacks:
        for name, url, headers in stacks:
            asyncio.run(measure(name, url, headers, args))


if __name__ == "__main__":
    main()
