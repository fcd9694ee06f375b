"""The rate limiter's logic without a Redis server: the local buckets behind the common interface,
the limits each key gets, the Redis settings' validation, and what the Redis-backed limiter does
when nothing answers at its address (it limits on its local buckets, and says so once)."""

from __future__ import annotations

import logging
import socket
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from services.gateway.auth import ApiKey
from services.gateway.config import GatewayConfig
from services.gateway.errors import GatewayError, retry_delay
from services.gateway.ratelimit import Limiter, RateLimiter, RateLimits, effective_limits, request_capacity
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
    assert config.redis_url == "" and config.redis_timeout == 0.05


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
