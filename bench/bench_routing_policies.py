"""Prefix affinity against round robin over two generator replicas, measured in one run.

32 multi-turn chats (4 turns each, one shared system prompt, each chat's turns in order, all chats at
once) are routed by the gateway's routing policies (services/gateway/routing.py: the same choose /
served calls and WatchLoad reports a gateway pool uses, made here in the client so that the policy is
all that differs). For each policy it prints the prompt tokens the generators computed (queried minus
prefix-cache hits, from their metrics), aggregate tokens/s and the median time to first token, then
the ratios round_robin / prefix_affinity. Each policy's chats open with their own tag, so that one
run's prefixes do not help the other's.

    .venv/bin/python bench/bench_routing_policies.py [--chats 32] [--turns 4] [--new-tokens 24] [--threads 1]
                                            [--rounds 1] [--think-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.gateway.config import GatewayConfig  # noqa: E402
from services.gateway.routing import LoadReport, follow_load, make_policy, prefix_key  # noqa: E402
from tests.fixtures_generator import GeneratorService, start_generator  # noqa: E402
from tests.stack import metric_samples  # noqa: E402

SYSTEM = (
    "You are a patient travel advisor. You answer in two or three short sentences, you name one "
    "concrete place and one practical tip in every answer, you never invent prices, and when the "
    "traveller's plan is unsafe you say so first and then suggest a safer alternative."
)
CITIES = ("Lisbon", "Kyoto", "Quito", "Oslo", "Hanoi", "Cusco", "Tbilisi", "Dakar")
FOLLOW_UPS = (
    "What should I see on my first day there?",
    "Where could I eat something local in the evening?",
    "How do I get around without a car?",
)


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    outstanding: int = 0
    load_report: LoadReport | None = None


@dataclass
class Figures:
    prefill_tokens: float
    tokens_per_second: float
    median_ttft: float
    per_replica: dict[str, int]
    # The median time to first token of each turn.
    turn_ttft: list[float]


def computed_tokens(services: list[GeneratorService]) -> float:
    """Prompt tokens looked up minus those the prefix cache answered, over every replica."""
    total = 0.0
    for service in services:
        for name, _, value in metric_samples(service.metrics_port):
            if name == "generator_prefix_cache_queried_tokens_total":
                total += value
            elif name == "generator_prefix_cache_hit_tokens_total":
                total -= value
    return total


async def run_policy(
    policy_name: str,
    tag: str,
    services: list[GeneratorService],
    chats: int,
    turns: int,
    new_tokens: int,
    think_s: float,
) -> Figures:
    config = dataclasses.replace(GatewayConfig(), routing_policy=policy_name)  # type: ignore[arg-type]
    policy = make_policy(config)
    replicas = [Replica(s.address, grpc.aio.insecure_channel(s.address)) for s in services]
    followers = [asyncio.create_task(follow_load(r, "generator")) for r in replicas]
    stubs = {r.address: generation_pb2_grpc.GenerationServiceStub(r.channel) for r in replicas}
    ttfts: list[float] = []
    by_turn: list[list[float]] = [[] for _ in range(turns)]
    generated = 0
    picks: dict[str, int] = {r.address: 0 for r in replicas}

    async def chat(index: int) -> None:
        nonlocal generated
        pause = random.Random(index)
        await asyncio.sleep(pause.uniform(0, think_s))  # chats start apart, as users do
        city = CITIES[index % len(CITIES)]
        messages = [
            common_pb2.ChatMessage(role="system", content=f"[{tag}] {SYSTEM}"),
            common_pb2.ChatMessage(
                role="user", content=f"Traveller {index}: I am going to {city} next month."
            ),
        ]
        for turn in range(turns):
            if turn:
                await asyncio.sleep(pause.uniform(0, think_s))  # the user reads the answer
                messages.append(common_pb2.ChatMessage(role="user", content=FOLLOW_UPS[(turn - 1) % 3]))
            request = generation_pb2.ChatRequest(messages=messages)
            request.parameters.max_new_tokens = new_tokens
            request.parameters.temperature = 0
            prefix = prefix_key(request)
            replica = policy.choose(replicas, prefix)
            policy.served(replica, prefix)
            picks[replica.address] += 1
            replica.outstanding += 1
            started = time.perf_counter()
            first = 0.0
            text = ""
            try:
                async for reply in stubs[replica.address].ChatStream(request):
                    if not first:
                        first = time.perf_counter() - started
                    if reply.HasField("usage"):
                        generated += reply.usage.completion_tokens
                    if reply.finish_reason:
                        text = reply.generated_text
            finally:
                replica.outstanding -= 1
            ttfts.append(first)
            by_turn[turn].append(first)
            messages.append(common_pb2.ChatMessage(role="assistant", content=text))

    before = computed_tokens(services)
    started = time.perf_counter()
    await asyncio.gather(*(chat(index) for index in range(chats)))
    elapsed = time.perf_counter() - started
    after = computed_tokens(services)
    for task in followers:
        task.cancel()
    for replica in replicas:
        await replica.channel.close()
    turn_ttft = [statistics.median(values) for values in by_turn]
    return Figures(after - before, generated / elapsed, statistics.median(ttfts), picks, turn_ttft)


async def main(args: argparse.Namespace) -> None:
    extra = ["--threads", str(args.threads)] if args.threads else []
    services = [start_generator(extra), start_generator(extra)]
    try:
        results: dict[str, list[Figures]] = {"round_robin": [], "prefix_affinity": []}
        # Rounds alternate the order, so that load from elsewhere hits both policies alike.
        for round_number in range(args.rounds):
            order = ["round_robin", "prefix_affinity"][:: 1 if round_number % 2 == 0 else -1]
            for name in order:
                tag = f"{name} {round_number}"
                figures = await run_policy(
                    name, tag, services, args.chats, args.turns, args.new_tokens, args.think_ms / 1000
                )
                results[name].append(figures)
                print(
                    f"{name:16s} prefill tokens {figures.prefill_tokens:8.0f}  "
                    f"aggregate {figures.tokens_per_second:6.1f} tok/s  "
                    f"median TTFT {figures.median_ttft * 1000:6.0f} ms  "
                    f"requests per replica {sorted(figures.per_replica.values())}  "
                    f"TTFT by turn (ms) {[round(t * 1000) for t in figures.turn_ttft]}",
                    flush=True,
                )

        def total(name: str, figure: str) -> float:
            return sum(float(getattr(f, figure)) for f in results[name])

        prefill = total("round_robin", "prefill_tokens") / max(total("prefix_affinity", "prefill_tokens"), 1)
        ttft = total("round_robin", "median_ttft") / total("prefix_affinity", "median_ttft")
        rate = total("prefix_affinity", "tokens_per_second") / total("round_robin", "tokens_per_second")
        print(
            f"round_robin / prefix_affinity over {args.rounds} round(s): prefill tokens {prefill:.2f}x, "
            f"median TTFT {ttft:.2f}x (above 1: affinity is faster); "
            f"prefix_affinity / round_robin aggregate tokens/s {rate:.2f}x"
        )
    finally:
        for service in services:
            service.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument(
        "--think-ms", type=float, default=0.0, help="most time a user waits before a chat and between turns"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of both policies, alternating their order"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="runtime threads of each generator (0: default)"
    )
    asyncio.run(main(parser.parse_args()))
