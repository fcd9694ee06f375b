"""Prefix affinity against round robin: two generator replicas of the default model behind one
gateway (started as `GENERATOR_REPLICAS=2 make run` starts them), 32 multi-turn chats in one run.

Each chat has 4 turns; every chat shares one system prompt, and each turn sends the whole
conversation so far: the previous answers and a new user message. The chats run concurrently,
their turns one after another, each answer of its own length (0.5x to 1.5x `--tokens`) and each
turn after its own pause (a user reading): chats in lockstep would keep their order turn after
turn, and round robin would send each back to the same replica by accident. The same chats run
once with `GATEWAY_ROUTING_POLICY=round_robin` and once with `prefix_affinity`, each on a fresh
stack (empty prefix caches). For each it prints the prefill tokens computed (the generators'
`generator_prompt_tokens_total` minus `generator_prefix_cache_hit_tokens_total`, summed over the
replicas), the aggregate generated tokens/s and the median time to first token; then the ratios.
Goal: at least 1.5x fewer prefill tokens and a lower median TTFT with prefix affinity, aggregate
tokens/s within 5%.

    .venv/bin/python bench/bench_routing.py --chats 32 --turns 4 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

from tests.replica_stack import Stack, counter, make_run  # noqa: E402

POLICIES = ("round_robin", "prefix_affinity")
SYSTEM = (
    "You are a patient travel guide for Europe. Answer in two or three short sentences, in plain "
    "words, without lists. Name places precisely, give one practical tip when it helps, and say "
    "so when you do not know. Prefer public transport, walking and trains; mention prices only "
    "when asked. Keep the tone friendly and the facts checked; do not invent opening hours."
)
CITIES = ("Paris", "Rome", "Vienna", "Lisbon", "Prague", "Berlin", "Madrid", "Dublin")
QUESTIONS = (
    "I will spend a weekend in {city}. Where should I start?",
    "What should I eat there?",
    "How do I get around the city?",
    "Which day trip would you suggest?",
    "Anything to avoid?",
    "What is a good souvenir?",
)


@dataclass
class Result:
    prompt_tokens: float
    prefill_tokens: float
    generated_tokens: int
    seconds: float
    ttfts: list[float]


async def chat(
    stub: generation_pb2_grpc.GenerationServiceAsyncStub, n: int, turns: int, tokens: int
) -> tuple[int, list[float]]:
    """One conversation of `turns` turns: (tokens generated, time to first token of each turn)."""
    messages = [common_pb2.ChatMessage(role="system", content=SYSTEM)]
    generated, ttfts = 0, []
    # The same lengths and pauses for every policy: a function of the chat and the turn only.
    pick = random.Random(n)
    for turn in range(turns):
        await asyncio.sleep(pick.uniform(0.0, 0.5))
        length = max(1, round(tokens * pick.uniform(0.5, 1.5)))
        question = QUESTIONS[turn % len(QUESTIONS)].format(city=CITIES[n % len(CITIES)])
        messages.append(
            common_pb2.ChatMessage(role="user", content=f"({n}) {question}" if turn == 0 else question)
        )
        request = generation_pb2.GenerateStreamRequest(
            messages=messages,
            parameters=common_pb2.SamplingParameters(max_new_tokens=length, do_sample=False),
        )
        started, first, answer = time.perf_counter(), None, ""
        async for message in stub.GenerateStream(request, timeout=600):
            if first is None and message.HasField("token"):
                first = time.perf_counter() - started
            if message.generated_text:
                answer = message.generated_text
            if message.HasField("usage"):
                generated += message.usage.completion_tokens
        ttfts.append(first if first is not None else time.perf_counter() - started)
        messages.append(common_pb2.ChatMessage(role="assistant", content=answer))
    return generated, ttfts


async def conversations(stack: Stack, chats: int, turns: int, tokens: int) -> Result:
    prompt_before = counter(stack.generator_metrics, "generator_prompt_tokens_total")
    hits_before = counter(stack.generator_metrics, "generator_prefix_cache_hit_tokens_total")
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        started = time.perf_counter()
        done = await asyncio.gather(*(chat(stub, n, turns, tokens) for n in range(chats)))
        seconds = time.perf_counter() - started
    prompt = counter(stack.generator_metrics, "generator_prompt_tokens_total") - prompt_before
    hits = counter(stack.generator_metrics, "generator_prefix_cache_hit_tokens_total") - hits_before
    return Result(
        prompt, prompt - hits, sum(made for made, _ in done), seconds, [t for _, ttfts in done for t in ttfts]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens per turn")
    parser.add_argument(
        "--prefix-cache-mib", type=int, default=1024, help="each generator's prefix cache (every chat fits)"
    )
    args = parser.parse_args()
    results: dict[str, Result] = {}
    for policy in POLICIES:
        settings = {
            "GENERATOR_REPLICAS": "2",
            "GENERATOR_PREFIX_CACHE_MIB": str(args.prefix_cache_mib),
            "GATEWAY_ROUTING_POLICY": policy,
        }
        with make_run(settings) as stack:
            result = asyncio.run(conversations(stack, args.chats, args.turns, args.tokens))
            per_replica = [
                counter([port], "generator_generated_tokens_total") for port in stack.generator_metrics
            ]
        results[policy] = result
        print(
            f"{policy:16s} prefill tokens {result.prefill_tokens:.0f} of {result.prompt_tokens:.0f}   "
            f"{result.generated_tokens / result.seconds:6.1f} tok/s   "
            f"median TTFT {statistics.median(result.ttfts) * 1e3:7.1f} ms   "
            f"tokens per replica {', '.join(f'{value:.0f}' for value in per_replica)}"
        )
    rr, pa = results["round_robin"], results["prefix_affinity"]
    print(
        f"{args.chats} chats x {args.turns} turns: round_robin / prefix_affinity prefill tokens "
        f"{rr.prefill_tokens / max(pa.prefill_tokens, 1):.2f}x (goal >= 1.5x); median TTFT prefix_affinity / "
        f"round_robin {statistics.median(pa.ttfts) / statistics.median(rr.ttfts):.2f}x (goal < 1); tok/s "
        f"prefix_affinity / round_robin "
        f"{(pa.generated_tokens / pa.seconds) / (rr.generated_tokens / rr.seconds):.3f}x (goal 0.95-1.05)"
    )


if __name__ == "__main__":
    main()
