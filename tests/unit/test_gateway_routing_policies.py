"""The gateway's routing policies over fake replicas (round robin, least loaded, prefix affinity),
the prefix keys of requests, the routing settings, and follow_load against an in-process server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, info_pb2, info_pb2_grpc

from services.common.config import load_config
from services.gateway import routing
from services.gateway.config import GatewayConfig
from services.gateway.routing import (
    BLOCK_CHARS,
    MAX_PREFIX_KEYS,
    LeastLoaded,
    LoadReport,
    PrefixAffinity,
    RoundRobin,
    follow_load,
    load_of,
    make_policy,
    prefix_key,
)
from tests.unit.fakes import eventually, within

SYSTEM = "You are a careful assistant who answers in one short paragraph. " * 3


@dataclass(eq=False)
class FakeReplica:
    address: str
    outstanding: int = 0
    load_report: LoadReport | None = None
    channel: Any = None


def replicas(count: int) -> list[FakeReplica]:
    return [FakeReplica(f"10.0.0.{index}:50052") for index in range(count)]


def chat(*turns: tuple[str, str], model: str = "llm") -> generation_pb2.ChatRequest:
    messages = [common_pb2.ChatMessage(role="system", content=SYSTEM)]
    messages += [common_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    return generation_pb2.ChatRequest(model=model, messages=messages)


def route(policy: routing.RoutingPolicy, pool: list[FakeReplica], request: Any) -> FakeReplica:
    """One pick as a pool makes it: choose, count the call as in flight, record the prefix."""
    prefix = prefix_key(request)
    replica = policy.choose(pool, prefix)
    policy.served(replica, prefix)
    replica.outstanding += 1
    return replica


def affinity(bound: float = 1.25, slack: float = 2.0, entries: int = 65536) -> PrefixAffinity:
    return PrefixAffinity(bound, slack, entries)


# ----- round robin and least loaded -----


def test_round_robin_rotates_whatever_the_load() -> None:
    pool = replicas(3)
    pool[0].outstanding = 50
    policy = RoundRobin()
    picks = [policy.choose(pool, ()).address for _ in range(6)]
    assert picks == [r.address for r in pool] * 2


def test_least_loaded_follows_outstanding_calls() -> None:
    pool = replicas(3)
    pool[0].outstanding, pool[1].outstanding, pool[2].outstanding = 4, 1, 3
    assert LeastLoaded().choose(pool, ()) is pool[1]


def test_least_loaded_ties_rotate() -> None:
    pool = replicas(3)
    pool[2].outstanding = 5
    policy = LeastLoaded()
    picks = Counter(policy.choose(pool, ()).address for _ in range(10))
    assert picks == {pool[0].address: 5, pool[1].address: 5}


def test_least_loaded_weighs_reports_of_other_gateways_calls() -> None:
    pool = replicas(2)
    # No calls of ours on replica 0, but its report shows other gateways' work running and queued.
    pool[0].load_report = LoadReport(running=8, waiting=4, capacity=8, free_kv_tokens=100_000)
    pool[1].outstanding = 3
    pool[1].load_report = LoadReport(running=3, waiting=0, capacity=8, free_kv_tokens=100_000)
    assert LeastLoaded().choose(pool, ()) is pool[1]
    # Beyond capacity a request waits rather than computes: it counts twice.
    assert load_of(pool[0]) == 12 + 4


def test_least_loaded_avoids_a_replica_short_of_kv_tokens() -> None:
    pool = replicas(2)
    pool[0].load_report = LoadReport(running=1, waiting=0, capacity=8, free_kv_tokens=500)
    pool[1].load_report = LoadReport(running=2, waiting=0, capacity=8, free_kv_tokens=200_000)
    assert LeastLoaded().choose(pool, ()) is pool[1]
    # A pool that reports no KV cache (the embedder's 0) is judged by rows alone.
    for replica in pool:
        assert replica.load_report is not None
        replica.load_report = dataclasses.replace(replica.load_report, free_kv_tokens=0)
    assert LeastLoaded().choose(pool, ()) is pool[0]


# ----- prefix affinity -----


def test_affinity_keeps_a_conversation_on_one_replica_across_turns() -> None:
    pool = replicas(3)
    policy = affinity()
    turns: list[tuple[str, str]] = []
    for conversation in range(6):
        turns = [("user", f"conversation {conversation}: tell me about topic number {conversation}")]
        first = route(policy, pool, chat(*turns))
        first.outstanding -= 1  # a turn's call ends before the next turn
        for turn in range(3):
            turns += [("assistant", f"answer {turn} " * 20), ("user", f"and then what about {turn}?")]
            assert route(policy, pool, chat(*turns)) is first
            first.outstanding -= 1


def test_affinity_spreads_distinct_conversations() -> None:
    pool = replicas(2)
    policy = affinity()
    firsts = [route(policy, pool, chat(("user", f"question {index}"))) for index in range(8)]
    counts = Counter(replica.address for replica in firsts)
    # They share the system prompt, which both replicas hold after their first call: the least
    # loaded of the holders takes each new conversation.
    assert counts == {pool[0].address: 4, pool[1].address: 4}


def test_affinity_spreads_unrelated_prompts_by_load() -> None:
    pool = replicas(4)
    policy = affinity()
    for index in range(40):
        request = generation_pb2.GenerateRequest(model="llm", prompt=f"{index} unrelated prompt " * 10)
        route(policy, pool, request)
    assert sorted(replica.outstanding for replica in pool) == [10, 10, 10, 10]


def test_affinity_moves_when_the_holder_is_over_the_bound() -> None:
    pool = replicas(2)
    policy = affinity(bound=1.25, slack=2.0)
    turns = [("user", "a question that starts a long conversation")]
    holder = route(policy, pool, chat(*turns))
    other = pool[1] if holder is pool[0] else pool[0]
    turns += [("assistant", "an answer " * 10), ("user", "a follow-up")]
    # Within the bound: 10 <= 1.25 * 7 + 2.
    holder.outstanding, other.outstanding = 10, 7
    assert policy.choose(pool, prefix_key(chat(*turns))) is holder
    # Over it: 11 > 1.25 * 7 + 2.
    holder.outstanding = 11
    assert policy.choose(pool, prefix_key(chat(*turns))) is other
    # The slack keeps a nearly idle pool on the prefix: 2 <= 1.25 * 0 + 2.
    holder.outstanding, other.outstanding = 2, 0
    assert policy.choose(pool, prefix_key(chat(*turns))) is holder


def test_affinity_counts_reports_in_the_bound() -> None:
    pool = replicas(2)
    policy = affinity()
    request = chat(("user", "hello there"))
    holder = route(policy, pool, request)
    holder.outstanding = 0
    holder.load_report = LoadReport(running=8, waiting=6, capacity=8, free_kv_tokens=100_000)
    assert policy.choose(pool, prefix_key(request)) is not holder


def test_affinity_skips_a_holder_that_left_the_candidates() -> None:
    pool = replicas(2)
    policy = affinity()
    request = chat(("user", "hello there"))
    holder = route(policy, pool, request)
    others = [replica for replica in pool if replica is not holder]
    assert policy.choose(others, prefix_key(request)) is others[0]


def test_affinity_table_is_bounded_least_recently_used_out() -> None:
    pool = replicas(2)
    policy = affinity(entries=50)
    kept = chat(("user", "the conversation that keeps coming back"))
    holder = route(policy, pool, kept)
    for index in range(30):
        route(policy, pool, generation_pb2.GenerateRequest(model="llm", prompt=f"filler {index}"))
        policy.served(holder, prefix_key(kept))  # used again: stays
        assert len(policy) <= 50
    for replica in pool:
        replica.outstanding = 0
    assert policy.choose(pool, prefix_key(kept)) is holder
    for index in range(60):
        route(policy, pool, generation_pb2.GenerateRequest(model="llm", prompt=f"more filler {index}"))
    assert len(policy) == 50


def test_make_policy_follows_the_setting() -> None:
    def made(name: str) -> object:
        return make_policy(dataclasses.replace(GatewayConfig(), routing_policy=name))  # type: ignore[arg-type]

    assert isinstance(made("round_robin"), RoundRobin)
    assert type(made("least_loaded")) is LeastLoaded
    policy = made("prefix_affinity")
    assert isinstance(policy, PrefixAffinity) and policy.bound == 1.25 and policy.entries == 65536
    assert made("prefix_affinity") is not policy  # one per pool


# ----- prefix keys -----


def test_prefix_key_of_later_turns_starts_with_the_earlier_turns_keys() -> None:
    first = [("user", "What is the capital of France?")]
    second = [*first, ("assistant", "Paris is the capital of France."), ("user", "And of Italy?")]
    third = [*second, ("assistant", "Rome."), ("user", "Thanks!")]
    keys = [prefix_key(chat(*turns)) for turns in (first, second, third)]
    assert keys[1][: len(keys[0])] == keys[0]
    assert keys[2][: len(keys[1])] == keys[1]
    assert len(keys[0]) < len(keys[1]) < len(keys[2])


def test_prefix_key_shares_the_system_prompt_between_conversations() -> None:
    one, two = prefix_key(chat(("user", "first question"))), prefix_key(chat(("user", "another")))
    shared = len(SYSTEM) // BLOCK_CHARS + 1  # its full blocks and the end of the message
    assert one[:shared] == two[:shared]
    assert one[shared:] and two[shared:] and one[shared] != two[shared]


def test_prefix_key_is_apart_per_model_and_request_kind() -> None:
    text = "Solve x + 1 = 2 for x, and explain each step to a student."
    keys = {
        prefix_key(generation_pb2.GenerateRequest(model="a", prompt=text)),
        prefix_key(generation_pb2.GenerateRequest(model="b", prompt=text)),
        prefix_key(generation_pb2.SolveMathRequest(model="a", problem=text)),
        prefix_key(generation_pb2.SolveCodingRequest(model="a", problem=text, language="python")),
        prefix_key(generation_pb2.SolveCodingRequest(model="a", problem=text, language="rust")),
        prefix_key(generation_pb2.GenerateStreamRequest(model="a", prompt=text)),
    }
    # GenerateRequest and GenerateStreamRequest with one prompt are the same prompt.
    assert len(keys) == 5


def test_prefix_key_message_boundaries_differ_from_the_same_text() -> None:
    joined = chat(("user", "ab"), ("user", "c"))
    split = chat(("user", "a"), ("user", "bc"))
    assert prefix_key(joined) != prefix_key(split)


def test_prefix_key_is_bounded_and_empty_without_a_prompt() -> None:
    long = generation_pb2.GenerateRequest(model="llm", prompt="x" * (BLOCK_CHARS * MAX_PREFIX_KEYS * 3))
    assert len(prefix_key(long)) == MAX_PREFIX_KEYS
    assert prefix_key(generation_pb2.GenerateRequest(model="llm")) == ()
    assert prefix_key(embedding_pb2.EmbedRequest(model="minilm")) == ()
    assert prefix_key(generation_pb2.GenerateRequest(model="llm", prompt="caf\u00e9 \U0001f600")) != ()


def test_prefix_key_covers_a_chat_through_generate_and_tools() -> None:
    messages = [common_pb2.ChatMessage(role="user", content="hello")]
    as_chat = generation_pb2.ChatRequest(model="llm", messages=messages)
    as_generate = generation_pb2.GenerateRequest(model="llm", messages=messages)
    assert prefix_key(as_chat) == prefix_key(as_generate)
    with_tools = generation_pb2.ChatRequest(model="llm", messages=messages)
    with_tools.tools.add().update({"type": "function", "function": {"name": "lookup"}})
    assert prefix_key(with_tools) != prefix_key(as_chat)


# ----- settings -----


def test_routing_settings_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(GatewayConfig, "GATEWAY", "", []).routing_policy == "prefix_affinity"
    monkeypatch.setenv("GATEWAY_ROUTING_POLICY", "least_loaded")
    assert load_config(GatewayConfig, "GATEWAY", "", []).routing_policy == "least_loaded"
    flags = [
        "--routing-policy",
        "round_robin",
        "--routing-load-bound",
        "2",
        "--routing-affinity-entries",
        "9",
    ]
    config = load_config(GatewayConfig, "GATEWAY", "", flags)
    assert (config.routing_policy, config.routing_load_bound, config.routing_affinity_entries) == (
        "round_robin",
        2.0,
        9,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"routing_policy": "random"}, "--routing-policy must be one of round_robin, least_loaded"),
        ({"routing_load_bound": 0.5}, "--routing-load-bound must be 1..100, got 0.5"),
        ({"routing_load_slack": -1.0}, "--routing-load-slack must be 0..1000, got -1"),
        ({"routing_affinity_entries": 0}, "--routing-affinity-entries must be 1..10000000, got 0"),
    ],
)
def test_routing_settings_out_of_range_name_the_setting(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(GatewayConfig(), **changes).validate()


def test_an_unknown_policy_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_ROUTING_POLICY", "fastest")
    with pytest.raises(SystemExit):
        load_config(GatewayConfig, "GATEWAY", "", [])
    assert (
        "--routing-policy must be one of round_robin, least_loaded, prefix_affinity"
        in capsys.readouterr().err
    )


# ----- follow_load -----


class LoadServer(info_pb2_grpc.InfoServiceServicer):
    """WatchLoad answering from a queue the test fills: a report, or None to end the stream."""

    def __init__(self) -> None:
        self.reports: asyncio.Queue[info_pb2.WatchLoadResponse | None] = asyncio.Queue()
        self.watches = 0

    async def WatchLoad(
        self, request: info_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[info_pb2.WatchLoadResponse]:
        self.watches += 1
        while (report := await self.reports.get()) is not None:
            yield report

    # Only WatchLoad is asked here.
    async def GetHealth(self, request: Any, context: Any) -> info_pb2.GetHealthResponse:
        return info_pb2.GetHealthResponse()

    async def GetStats(self, request: Any, context: Any) -> info_pb2.GetStatsResponse:
        return info_pb2.GetStatsResponse()

    async def ListServedModels(self, request: Any, context: Any) -> info_pb2.ListServedModelsResponse:
        return info_pb2.ListServedModelsResponse()


async def serve(servicer: info_pb2_grpc.InfoServiceServicer | None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    if servicer is not None:
        info_pb2_grpc.add_InfoServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_follow_load_keeps_the_report_and_survives_a_new_channel() -> None:
    servicer = LoadServer()
    server, address = await serve(servicer)
    replica = FakeReplica(address, channel=grpc.aio.insecure_channel(address))
    task = asyncio.create_task(follow_load(replica, "generator"))
    try:
        await servicer.reports.put(
            info_pb2.WatchLoadResponse(running=2, waiting=1, capacity=8, free_kv_tokens=9)
        )
        await within(eventually(lambda: replica.load_report is not None))
        assert replica.load_report == LoadReport(running=2, waiting=1, capacity=8, free_kv_tokens=9)
        # The stream ends (the replica drains): the report is dropped, and the watch starts again.
        await servicer.reports.put(None)
        await within(eventually(lambda: replica.load_report is None and servicer.watches == 2))
        # A new channel (new certificates): the next report is followed on it.
        old, replica.channel = replica.channel, grpc.aio.insecure_channel(address)
        await servicer.reports.put(info_pb2.WatchLoadResponse(running=1, capacity=8))
        await within(eventually(lambda: servicer.watches == 3))
        await old.close()
        await servicer.reports.put(info_pb2.WatchLoadResponse(running=5, capacity=8))
        await within(eventually(lambda: replica.load_report is not None and replica.load_report.running == 5))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await replica.channel.close()
        await server.stop(0)


async def test_follow_load_waits_long_on_a_backend_without_watch_load() -> None:
    server, address = await serve(None)  # health only: WatchLoad is UNIMPLEMENTED
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    replica = FakeReplica(address, channel=grpc.aio.insecure_channel(address))
    replica.load_report = LoadReport(1, 1, 1, 1)
    task = asyncio.create_task(follow_load(replica, "generator", sleep=sleep))
    try:
        await within(eventually(lambda: len(pauses) >= 2))
        assert replica.load_report is None
        assert pauses[:2] == [routing.LOAD_UNIMPLEMENTED_RETRY_S] * 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await replica.channel.close()
        await server.stop(0)


async def test_follow_load_drops_the_report_of_a_replica_that_went_away() -> None:
    servicer = LoadServer()
    server, address = await serve(servicer)
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    replica = FakeReplica(address, channel=grpc.aio.insecure_channel(address))
    task = asyncio.create_task(follow_load(replica, "generator", sleep=sleep))
    try:
        await servicer.reports.put(info_pb2.WatchLoadResponse(running=3, capacity=8))
        await within(eventually(lambda: replica.load_report is not None))
        await server.stop(0)  # the replica dies mid-stream
        await within(eventually(lambda: replica.load_report is None and bool(pauses)))
        # A short pause, then the watch waits for the replica to come back.
        assert pauses[0] == routing.LOAD_RETRY_S
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await replica.channel.close()
