"""One rate limit across gateways, in a real Redis (Debian's redis-server, started by the tests).

The scripts first, from two limiters in this process (two gateways' worth) against the session's
Redis; then three real gateway processes sharing one Redis: a key hammered through all three for
~20 s is admitted at its limit once, not three times; and with Redis stopped mid-run the gateways
keep answering on their own buckets, say so in their metrics and log, and use Redis again once it
is back. Budget: about 90 s with the shared generator and embedder already up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
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

from services.gateway.auth import ApiKey
from services.gateway.errors import GatewayError, retry_delay
from services.gateway.ratelimit import RateLimits
from services.gateway.ratelimit_redis import RedisRateLimiter
from tests.fixtures_gateway import start_gateway
from tests.fixtures_redis import RedisServer
from tests.reliability.figures import report
from tests.stack import ServiceProcess

PREFIX = "test:ratelimit:"
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
        # Generous for a loaded 2-core machine: a timeout here would fall back and admit more.
        "--redis-timeout",
        "1.0",
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
    tally = await hammer(gateways.addresses, gateways.keys["shared"], 20.0)
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
    )
    assert tally.unexpected == []
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
