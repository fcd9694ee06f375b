"""One rate limit across gateways, in a real Redis (Debian's redis-server, started by the tests).

The scripts first, from limiters in this process (two gateways' worth) against the session's
Redis: a shared budget, 300 checks at once queueing for the pool with no fallback, expiry by the
current rate, an odd script answer as a store failure, no connection left by a failed build. Then
three real gateway processes sharing one Redis at the default timeout: 150 callers hammering one
key through all three for ~20 s are admitted at its limit once, not three times, with no fallback;
and with Redis stopped mid-run the gateways keep answering on their own buckets, say so in their
metrics and log, and use Redis again once it is back. Budget: about 90 s with the shared generator
and embedder already up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from inference.v1 import openai_pb2, openai_pb2_grpc
from prometheus_client import REGISTRY

from services.gateway.auth import ApiKey
from services.gateway.config import GatewayConfig
from services.gateway.errors import GatewayError, retry_delay
from services.gateway.ratelimit import RateLimits
from services.gateway.ratelimit_redis import RedisRateLimiter
from services.gateway.server import build
from tests.fixtures_gateway import start_gateway
from tests.fixtures_redis import RedisServer
from tests.reliability.figures import report
from tests.stack import ServiceProcess

PREFIX = "test:ratelimit:"
# Per gateway: its Redis connections, and the callers of the shared run (50 > 16: they queue).
POOL, CALLERS = 16, 50
RPM, BURST = 120, 10
RATE = RPM / 60.0
# (name, limits): "shared" for the 20 s run, "outage" for the Redis outage, "warm" unlimited.
KEYS = {
    "shared": {"requests_per_minute": RPM, "burst": BURST},
    "outage": {"requests_per_minute": RPM, "burst": BURST},
    "warm": {},
}


# --- the scripts, from two limiters in this process ---------------------------------------------


def fresh_prefix() -> str:
    return f"test:{secrets.token_hex(4)}:"


async def test_two_limiters_share_one_request_budget_in_redis(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    first, second = (
        RedisRateLimiter(RateLimits(0, 0, 0), redis_server.url, prefix, timeout=2.0) for _ in range(2)
    )
    plain = "sk-never-stored-" + secrets.token_hex(8)
    key = ApiKey(
        "team-a", hashlib.sha256(plain.encode()).hexdigest(), frozenset(), requests_per_minute=6, burst=3
    )
    admitted, refusals = 0, []
    try:
        for limiter in (first, second, first, second, first, second):
            try:
                await limiter.acquire(key)
                admitted += 1
            except GatewayError as refused:
                refusals.append(refused)
    finally:
        await first.close()
        await second.close()
    # 6 a minute refills one request in 10 s: the six calls see the burst of 3 and nothing more.
    assert admitted == 3 and len(refusals) == 3
    assert refusals[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "6 requests per minute (burst 3)" in refusals[0].message
    delay = retry_delay(refusals[0])
    assert delay is not None and 5 < delay <= 10.01
    client = redis_server.client()
    stored = sorted(str(name) for name in client.keys(prefix + "*"))
    assert stored == [f"{prefix}{{team-a}}:requests"]
    contents = json.dumps(client.hgetall(stored[0])) + stored[0]
    assert plain not in contents and key.digest not in contents
    # An idle key expires once it would have refilled: 3 requests at 0.1 a second, plus 1 s.
    assert 0 < client.pttl(stored[0]) <= 31_000


async def test_tokens_one_gateway_charges_are_seen_by_another(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    first, second = (
        RedisRateLimiter(RateLimits(0, 0, 0), redis_server.url, prefix, timeout=2.0) for _ in range(2)
    )
    key = ApiKey("team-b", "", frozenset(), tokens_per_minute=600)
    try:
        await first.acquire(key)
        first.charge(key, 700)
        await first.drain()
        with pytest.raises(GatewayError) as refused:
            await second.acquire(key)
    finally:
        await first.close()
        await second.close()
    assert "600 tokens per minute" in refused.value.message
    delay = retry_delay(refused.value)
    assert delay is not None and 10 < delay <= 10.2  # from -100 to +1 at 10 tokens a second
    # It expires once refilled: from -100 to 600 at 10 a second, plus 1 s.
    assert 60_000 < redis_server.client().pttl(f"{prefix}{{team-b}}:tokens") <= 71_000


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"store": "redis"}) or 0.0


async def test_a_burst_beyond_the_pool_queues_for_connections_and_never_falls_back(
    redis_server: RedisServer,
) -> None:
    # The default timeout and pool (64): 300 checks at once, more than redis-py's default pool of
    # 100 would open (it refused the 101st, and the gateway took Redis for down).
    limiter = RedisRateLimiter(RateLimits(0, 0, 0), redis_server.url, fresh_prefix())
    key = ApiKey("burst", "", frozenset(), requests_per_minute=6, burst=10)
    fallbacks = sample("gateway_rate_limit_fallbacks_total")

    async def check() -> bool:
        try:
            await limiter.acquire(key)
            return True
        except GatewayError:
            return False

    try:
        await limiter.start()
        started = time.monotonic()
        results = await asyncio.gather(*(check() for _ in range(300)))
        took = time.monotonic() - started
    finally:
        await limiter.close()
    report(
        "redis_burst",
        checks=300,
        admitted=sum(results),
        seconds=round(took, 2),
        pool_waits=limiter.pool_waits,
    )
    assert limiter.up
    assert sample("gateway_rate_limit_fallbacks_total") == fallbacks
    # The burst of 10, and at most one more refilled (6 a minute) while the 300 ran.
    assert 10 <= sum(results) <= 11, sum(results)


async def test_a_lowered_rate_keeps_the_bucket_until_it_has_refilled(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    limiter = RedisRateLimiter(RateLimits(0, 0, 0), redis_server.url, prefix, timeout=2.0)
    try:
        await limiter.acquire(ApiKey("slowed", "", frozenset(), requests_per_minute=600, burst=1))
        with pytest.raises(GatewayError):
            # The key's limit lowered to 6 a minute: empty, it refills in 10 s, not 0.1 s.
            await limiter.acquire(ApiKey("slowed", "", frozenset(), requests_per_minute=6, burst=1))
    finally:
        await limiter.close()
    assert 9_000 < redis_server.client().pttl(f"{prefix}{{slowed}}:requests") <= 11_000


async def test_an_unexpected_script_answer_falls_back_as_a_store_failure(redis_server: RedisServer) -> None:
    limiter = RedisRateLimiter(RateLimits(0, 0, 0), redis_server.url, fresh_prefix(), timeout=2.0)
    key = ApiKey("odd-answer", "", frozenset(), requests_per_minute=60, burst=2)
    fallbacks = sample("gateway_rate_limit_fallbacks_total")
    try:
        limiter._check = limiter._client.register_script("return 1")
        await limiter.acquire(key)  # on the local buckets, not a 500
        await limiter.acquire(key)
        with pytest.raises(GatewayError):
            await limiter.acquire(key)
    finally:
        await limiter.close()
    assert not limiter.up
    assert sample("gateway_rate_limit_fallbacks_total") - fallbacks == 3


async def test_a_gateway_that_fails_to_build_leaves_no_connection_to_redis(redis_server: RedisServer) -> None:
    client = redis_server.client()
    before = len(client.client_list())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = GatewayConfig(
            host="127.0.0.1",
            port=taken.getsockname()[1],
            redis_url=redis_server.url,
            tracing=False,
            generator_addresses="127.0.0.1:1",
            embedder_addresses="127.0.0.1:1",
        )
        with pytest.raises(RuntimeError):
            await build(config)
    assert len(client.client_list()) == before


# --- three gateways, one Redis ------------------------------------------------------------------


@dataclass
class Gateways:
    redis: RedisServer
    processes: list[ServiceProcess]
    addresses: list[str]
    metrics_ports: list[int]
    keys: dict[str, str]


@pytest.fixture(scope="module")
def gateways(
    generator_address: str, embedder_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateways]:
    redis = RedisServer().start()
    keys = {name: f"sk-redis-{name}-{secrets.token_hex(8)}" for name in KEYS}
    keys_file: Path = tmp_path_factory.mktemp("redis-keys") / "keys.json"
    entries = [
        {"name": name, "sha256": hashlib.sha256(keys[name].encode()).hexdigest(), "scopes": ["generate"]}
        | KEYS[name]
        for name in KEYS
    ]
    keys_file.write_text(json.dumps({"keys": entries}))
    args = (
        "--api-keys-file",
        str(keys_file),
        "--redis-url",
        redis.url,
        "--redis-key-prefix",
        PREFIX,
        # The default --redis-timeout (a fallback would admit more, and fails the shared run), and
        # fewer connections than callers per gateway, so that checks queue for one.
        "--redis-max-connections",
        str(POOL),
        "--redis-retry-seconds",
        "0.5",
        "--tracing",
        "false",
    )
    with ThreadPoolExecutor(3) as pool:
        started = [
            pool.submit(start_gateway, generator_address, embedder_address, args, None, f"gateway-redis-{i}")
            for i in range(3)
        ]
        results = []
        for future in started:
            try:
                results.append(future.result())
            except BaseException:
                for done in started:
                    if done.done() and done.exception() is None:
                        done.result()[0].stop()
                redis.close()
                raise
    yield Gateways(redis, [r[0] for r in results], [r[1] for r in results], [r[2] for r in results], keys)
    for process, _, _ in results:
        process.stop()
    redis.close()


@dataclass
class Tally:
    admitted: list[int]
    refused: int = 0
    unexpected: list[str] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0
    slowest: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.admitted)

    @property
    def elapsed(self) -> float:
        return self.last - self.first

    def expected(self) -> float:
        """What one global bucket admits between the first call and the last."""
        return BURST + RATE * self.elapsed


async def hammer(
    addresses: list[str], key: str, seconds: float, workers: int = 3, pause: float = 0.03
) -> Tally:
    """ListModels (rate limited, cheap: the model list is cached) as `key` from `workers` loops on
    each gateway for `seconds`, a short pause after each call to spare the machine's two cores."""
    tally = Tally([0] * len(addresses))
    metadata = (("authorization", f"Bearer {key}"),)
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    started = time.monotonic()
    tally.first = started
    deadline = started + seconds

    async def loop(index: int) -> None:
        stub = openai_pb2_grpc.OpenAIServiceStub(channels[index])
        while time.monotonic() < deadline:
            sent = time.monotonic()
            tally.last = max(tally.last, sent)
            try:
                await stub.ListModels(openai_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
                tally.admitted[index] += 1
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    tally.refused += 1
                else:
                    tally.unexpected.append(f"{error.code().name}: {error.details()}")
            tally.slowest = max(tally.slowest, time.monotonic() - sent)
            await asyncio.sleep(pause)

    try:
        await asyncio.gather(*(loop(i) for i in range(len(addresses)) for _ in range(workers)))
    finally:
        for channel in channels:
            await channel.close()
    return tally


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def store_up(gateways: Gateways) -> list[float]:
    return [metric(port, "gateway_rate_limit_store_up", store="redis") for port in gateways.metrics_ports]


def fallbacks(gateways: Gateways) -> list[float]:
    ports = gateways.metrics_ports
    return [metric(port, "gateway_rate_limit_fallbacks_total", store="redis") for port in ports]


def log_count(process: ServiceProcess, text: str) -> int:
    return process.log_path.read_text(errors="replace").count(text)


async def test_three_gateways_admit_one_keys_limit_once(gateways: Gateways) -> None:
    # The first call of each gateway fetches the model list from the backends; not measured.
    await hammer(gateways.addresses, gateways.keys["warm"], 0.5, workers=1)
    before = fallbacks(gateways)
    # 150 callers at once, then each again after a pause that spares the machine's two cores.
    tally = await hammer(gateways.addresses, gateways.keys["shared"], 20.0, workers=CALLERS, pause=0.25)
    expected = tally.expected()
    ratio = tally.total / expected
    report(
        "redis_rate_limit",
        admitted=tally.total,
        expected=round(expected, 1),
        ratio=round(ratio, 3),
        refused=tally.refused,
        per_gateway="/".join(str(n) for n in tally.admitted),
        seconds=round(tally.elapsed, 1),
        fallbacks=sum(fallbacks(gateways)) - sum(before),
        callers=CALLERS * len(gateways.addresses),
    )
    assert tally.unexpected == []
    assert fallbacks(gateways) == before, "a check fell back to the local buckets"
    assert tally.refused > 10 * tally.total, "the key was not hammered past its limit"
    assert all(n > 0 for n in tally.admitted), tally.admitted
    # Per-process buckets would admit about three times as much.
    assert abs(ratio - 1) <= 0.10, f"admitted {tally.total}, expected {expected:.1f}"
    assert store_up(gateways) == [1.0, 1.0, 1.0]


async def test_with_redis_down_the_gateways_limit_locally_then_share_again(gateways: Gateways) -> None:
    key = gateways.keys["outage"]
    client = gateways.redis.client()
    await hammer(gateways.addresses, key, 1.0, workers=1)
    assert client.exists(f"{PREFIX}{{outage}}:requests") == 1
    before = fallbacks(gateways)

    gateways.redis.stop()
    down = await hammer(gateways.addresses, key, 4.0)
    assert down.unexpected == [], down.unexpected[:5]
    assert down.slowest < 3.0, f"a call took {down.slowest:.1f}s while Redis was down"
    assert store_up(gateways) == [0.0, 0.0, 0.0]
    assert all(after > prior for after, prior in zip(fallbacks(gateways), before, strict=True))
    # Each gateway limits on its own buckets: each within one key's limit, together above it.
    local_bound = BURST + RATE * down.elapsed
    assert all(0 < n <= local_bound * 1.1 + 1 for n in down.admitted), (down.admitted, local_bound)
    assert down.total > 1.5 * local_bound, (down.admitted, local_bound)
    for process in gateways.processes:
        assert log_count(process, "rate limits are this gateway's own") == 1, process.log_tail()

    gateways.redis.start()
    started = time.monotonic()
    while store_up(gateways) != [1.0, 1.0, 1.0]:
        assert time.monotonic() - started < 20, f"store still down: {store_up(gateways)}"
        await hammer(gateways.addresses, key, 0.5, workers=1)
    recovered_after = time.monotonic() - started
    # A key whose local buckets are all full (it never fell back) and whose shared one is new (the
    # restarted Redis is empty): on their own buckets the three would admit three bursts.
    back = await hammer(gateways.addresses, gateways.keys["shared"], 3.0)
    assert back.unexpected == []
    assert back.total <= back.expected() * 1.1 + 1, (back.admitted, back.expected())
    assert client.exists(f"{PREFIX}{{outage}}:requests", f"{PREFIX}{{shared}}:requests") == 2
    for process in gateways.processes:
        assert log_count(process, "answers again") == 1, process.log_tail()
        assert log_count(process, "rate limits are this gateway's own") == 1
    report(
        "redis_outage",
        admitted_while_down=down.total,
        one_limit=round(local_bound, 1),
        slowest_call_s=round(down.slowest, 2),
        recovered_after_s=round(recovered_after, 1),
        admitted_after=back.total,
        expected_after=round(back.expected(), 1),
    )
