"""The rate limiter's logic without a Redis server: the local buckets behind the common interface,
the limits each key gets, the Redis settings' validation, and what the Redis-backed limiter does
when nothing answers at its address (it limits on its local buckets, and says so once)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time

import grpc
import pytest
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from services.gateway.auth import ApiKey
from services.gateway.config import GatewayConfig
from services.gateway.errors import GatewayError, retry_delay
from services.gateway.ratelimit import (
    SWEEP_SECONDS,
    Limiter,
    RateLimiter,
    RateLimits,
    effective_limits,
    request_capacity,
)
from services.gateway.ratelimit_redis import RedisRateLimiter, bucket_keys, redacted
from tests.stack import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limited(name: str = "k", rpm: float = 60, burst: int = 3, tpm: float | None = None) -> ApiKey:
    return ApiKey(
        name, "", frozenset({"generate"}), requests_per_minute=rpm, burst=burst, tokens_per_minute=tpm
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_keys_take_their_own_limits_and_the_defaults_for_the_rest() -> None:
    default = RateLimits(requests_per_minute=30, tokens_per_minute=1000, burst=0)
    mixed = effective_limits(default, ApiKey("k", "", frozenset(), requests_per_minute=120, burst=10))
    assert mixed == RateLimits(120, 1000, 10)
    assert request_capacity(mixed) == 10
    # A burst of 0 lets a key send one minute's worth at once.
    assert request_capacity(effective_limits(default, ApiKey("k", "", frozenset()))) == 30


async def test_the_local_limiter_refuses_through_the_common_interface_and_refills() -> None:
    clock = Clock()
    limiter: Limiter = RateLimiter(RateLimits(0, 0, 0), clock)
    key = limited(rpm=120, burst=2)
    await limiter.acquire(key)
    await limiter.acquire(key)
    with pytest.raises(GatewayError) as refused:
        await limiter.acquire(key)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "120 requests per minute (burst 2)" in refused.value.message
    delay = retry_delay(refused.value)
    assert delay is not None and 0.49 <= delay <= 0.51
    clock.now += 0.5
    await limiter.acquire(key)


def test_taking_tokens_without_the_metric_still_empties_the_token_budget() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(0, 0, 0), clock)
    key = limited(rpm=0, burst=0, tpm=60)
    limiter.take_tokens(key, 61)
    with pytest.raises(GatewayError) as refused:
        limiter.admit(key)
    assert "60 tokens per minute" in refused.value.message
    delay = retry_delay(refused.value)
    assert delay is not None and 1.9 <= delay <= 2.1  # from -1 to +1 at one token a second


def test_bucket_keys_name_the_key_and_share_one_cluster_slot() -> None:
    requests, tokens = bucket_keys("app:rl:", "team-a")
    assert (requests, tokens) == ("app:rl:{team-a}:requests", "app:rl:{team-a}:tokens")


def test_the_redis_address_is_logged_without_its_password() -> None:
    assert redacted("redis://user:s3cret@cache:6379/2") == "redis://cache:6379/2"
    assert redacted("redis://cache:6379/0") == "redis://cache:6379/0"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"redis_url": "http://cache:6379"}, "--redis-url"),
        ({"redis_url": "cache:6379"}, "--redis-url"),
        ({"redis_timeout": 0.0}, "--redis-timeout"),
        ({"redis_timeout": 60.0}, "--redis-timeout"),
        ({"redis_retry_seconds": -1.0}, "--redis-retry-seconds"),
        ({"redis_max_connections": 0}, "--redis-max-connections"),
    ],
)
def test_bad_redis_settings_are_refused_naming_the_setting(settings: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        GatewayConfig(**settings).validate()  # type: ignore[arg-type]


def test_a_bad_redis_url_is_refused_without_echoing_its_password() -> None:
    with pytest.raises(ValueError) as refused:
        GatewayConfig(redis_url="http://user:s3cret@cache").validate()
    assert "s3cret" not in str(refused.value)


def test_the_redis_defaults_are_valid_and_off() -> None:
    config = GatewayConfig()
    config.validate()
    assert config.redis_url == "" and config.redis_timeout == 1.0
    assert config.redis_max_connections == 64


async def test_without_redis_the_limiter_keeps_limiting_locally_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    # Nothing listens there: every connection is refused at once.
    limiter = RedisRateLimiter(
        RateLimits(0, 0, 0), f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, retry_seconds=1.0, clock=clock
    )
    key = limited(name="fallback-unit", rpm=60, burst=3)
    fallbacks = sample("gateway_rate_limit_fallbacks_total", store="redis")
    try:
        with caplog.at_level(logging.INFO, logger="services.gateway.ratelimit_redis"):
            await limiter.start()
            for _ in range(3):
                await limiter.acquire(key)
            with pytest.raises(GatewayError) as refused:
                await limiter.acquire(key)
            clock.now += 1.5  # past the backoff: Redis is tried again, and fails again
            await limiter.acquire(key)
            limiter.charge(key, 5)
            await limiter.drain()
    finally:
        await limiter.close()
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not limiter.up
    assert sample("gateway_rate_limit_store_up", store="redis") == 0
    assert sample("gateway_rate_limit_fallbacks_total", store="redis") - fallbacks >= 5
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert failures[0].levelno == logging.WARNING and "own" in failures[0].getMessage()


async def test_keys_without_limits_never_ask_redis() -> None:
    limiter = RedisRateLimiter(RateLimits(0, 0, 0), f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    try:
        for _ in range(100):
            await limiter.acquire(ApiKey("unlimited", "", frozenset()))
    finally:
        await limiter.close()
    assert limiter.up


async def test_a_redis_that_does_not_answer_costs_one_timeout_then_the_local_buckets_serve() -> None:
    # A listening socket nobody accepts on: connections complete, answers never come.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        limiter = RedisRateLimiter(
            RateLimits(0, 0, 0), f"redis://127.0.0.1:{port}/0", timeout=0.1, retry_seconds=30.0
        )
        key = limited(name="silent-unit", rpm=60, burst=5)
        try:
            started = time.monotonic()
            await limiter.acquire(key)
            first = time.monotonic() - started
            started = time.monotonic()
            for _ in range(4):
                await limiter.acquire(key)
            rest = time.monotonic() - started
            with pytest.raises(GatewayError):
                await limiter.acquire(key)
        finally:
            await limiter.close()
    assert not limiter.up
    assert first < 2.0, f"the first check waited {first:.2f}s on a silent Redis"
    # Within the backoff nothing waits on Redis again.
    assert rest < 0.5


def test_the_local_limiter_drops_buckets_once_they_have_refilled() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(0, 0, 0), clock)
    for i in range(1000):  # one request each from many identities (JWT subjects are unbounded)
        limiter.admit(limited(name=f"jwt:user-{i}", rpm=60, burst=3, tpm=600))
    busy = limited(name="busy", rpm=60, burst=3)
    for _ in range(3):
        limiter.admit(busy)
    assert limiter.bucket_count == 2001
    # Past the sweep interval, every idle bucket has refilled (1 s per request, 60 s at most)...
    clock.now += SWEEP_SECONDS + 1
    for _ in range(3):
        limiter.admit(busy)
    assert limiter.bucket_count == 1
    # ...and a dropped bucket comes back full, as it was: nothing is forgotten early.
    with pytest.raises(GatewayError):
        limiter.admit(busy)
    clock.now += 1.0
    limiter.admit(busy)


async def test_a_late_answer_from_before_an_outage_neither_ends_nor_restarts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limiter = RedisRateLimiter(
        RateLimits(0, 0, 0), f"redis://127.0.0.1:{free_port()}/0", timeout=5.0, retry_seconds=1.0, clock=clock
    )
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "answer"

    async def fails() -> str:
        raise RedisConnectionError("gone")

    async def answers() -> str:
        return "answer"

    try:
        with caplog.at_level(logging.INFO, logger="services.gateway.ratelimit_redis"):
            early = [asyncio.create_task(limiter._call(slow)) for _ in range(2)]
            await asyncio.sleep(0)
            assert await limiter._call(fails) is None
            assert not limiter.up
            # Sent before the failure: its answer is used, but says nothing of Redis now.
            release.set()
            assert await early[0] == "answer"
            assert not limiter.up
            clock.now += 0.5
            assert await limiter._call(answers) is None  # still within the backoff
            clock.now += 1.0
            assert await limiter._call(answers) == "answer"  # the probe, sent after the failure
            assert limiter.up
            # A call sent before the next outage fails after it ended: no third outage.
            late = asyncio.Event()

            async def fails_late() -> str:
                await late.wait()
                raise RedisConnectionError("stale")

            stale = asyncio.create_task(limiter._call(fails_late))
            await asyncio.sleep(0)
            await early[1]
            assert await limiter._call(fails) is None
            clock.now += 2.0
            assert await limiter._call(answers) == "answer"
            late.set()
            assert await stale is None
            assert limiter.up
    finally:
        await limiter.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("answers again" in m for m in messages) == 2, messages
    assert sum("own until it answers" in m for m in messages) == 2, messages


async def test_a_check_that_waits_for_a_free_connection_falls_back_alone() -> None:
    limiter = RedisRateLimiter(
        RateLimits(0, 0, 0), f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, max_connections=1
    )
    key = limited(name="queued-unit", rpm=60, burst=3)
    fallbacks = sample("gateway_rate_limit_fallbacks_total", store="redis")

    async def busy() -> None:
        await asyncio.sleep(1.0)

    try:
        holder = asyncio.create_task(limiter._call(busy, seconds=5.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await limiter.acquire(key)  # on the local buckets: the one connection stays busy
        waited = time.monotonic() - started
        await holder
    finally:
        await limiter.close()
    assert limiter.up, "a wait for a pooled connection is not an outage"
    assert limiter.pool_waits == 1
    assert sample("gateway_rate_limit_fallbacks_total", store="redis") - fallbacks == 1
    assert waited < 0.9


class SlowRedis:
    """Speaks just enough RESP to look like a Redis whose every reply takes `delay` seconds and
    that never keeps a script (NOSCRIPT to EVALSHA): a check then costs up to six replies."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.commands: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                parts = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    parts.append((await reader.readexactly(size + 2))[:-2])
                self.commands.append(parts[0].decode().upper())
                await asyncio.sleep(self.delay)
                writer.write(self.reply(parts))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    def reply(parts: list[bytes]) -> bytes:
        command = parts[0].upper()
        if command == b"EVALSHA":
            return b"-NOSCRIPT No matching script.\r\n"
        if command == b"SCRIPT":
            sha = hashlib.sha1(parts[2]).hexdigest().encode()
            return b"$40\r\n" + sha + b"\r\n"
        if command == b"PING":
            return b"+PONG\r\n"
        if command == b"HELLO":
            return b"-ERR unknown command\r\n"
        return b"+OK\r\n"


async def test_a_check_takes_its_timeout_at_most_not_one_per_redis_call() -> None:
    slow = SlowRedis(delay=0.2)
    server = await asyncio.start_server(slow.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisRateLimiter(
        RateLimits(0, 0, 0), f"redis://127.0.0.1:{port}/0", timeout=0.3, retry_seconds=30.0
    )
    try:
        started = time.monotonic()
        await limiter.acquire(limited(name="slow-unit", rpm=60, burst=3))
        took = time.monotonic() - started
    finally:
        await limiter.close()
        server.close()
        await server.wait_closed()
    # Each reply comes within the timeout; a per-call timeout would wait for all of them (>= 1 s).
    assert took < 0.9, f"the check took {took:.2f}s ({slow.commands})"
    assert not limiter.up
