"""Per-key rate limits: requests per minute with a burst, and tokens per minute. Over the limit a
call gets RESOURCE_EXHAUSTED with RetryInfo (HTTP 429 through Envoy). Tokens are charged when a
backend reports usage (`charge_tokens`), so a request is admitted while its key's token budget is
positive and the budget may go negative by one request's worth.

Two implementations of one interface (`Limiter`): `RateLimiter` keeps the buckets in this process;
`services.gateway.ratelimit_redis.RedisRateLimiter` keeps them in Redis, shared by every gateway,
and falls back to a `RateLimiter` while Redis does not answer."""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.interceptors import BehaviorWrapper, Context, StreamBehavior, UnaryBehavior
from services.gateway.auth import ApiKey, current_key
from services.gateway.errors import GatewayError, resource_exhausted
from services.gateway.metrics import RATE_LIMITED, TOKENS


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second."""

    capacity: float
    rate: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it already is)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: float
    tokens_per_minute: float
    burst: int


def effective_limits(default: RateLimits, key: ApiKey) -> RateLimits:
    """The key's own limits, each one it does not set taken from `default`."""
    rpm = key.requests_per_minute if key.requests_per_minute is not None else default.requests_per_minute
    tpm = key.tokens_per_minute if key.tokens_per_minute is not None else default.tokens_per_minute
    burst = key.burst if key.burst is not None else default.burst
    return RateLimits(rpm, tpm, burst)


def request_capacity(limits: RateLimits) -> float:
    """The request bucket's size: the burst, or one minute's worth when the burst is 0."""
    return float(limits.burst) if limits.burst > 0 else limits.requests_per_minute


def token_refusal(key: ApiKey, limits: RateLimits, wait: float) -> GatewayError:
    return resource_exhausted(
        f"API key {key.name!r} is over its limit of {limits.tokens_per_minute:g} tokens per minute",
        wait,
        "TOKEN_RATE_LIMIT",
        {"limit": f"{limits.tokens_per_minute:g}", "per": "minute"},
    )


def request_refusal(key: ApiKey, limits: RateLimits, wait: float) -> GatewayError:
    capacity = request_capacity(limits)
    return resource_exhausted(
        f"API key {key.name!r} is over its limit of {limits.requests_per_minute:g} requests per "
        f"minute (burst {capacity:g})",
        wait,
        "REQUEST_RATE_LIMIT",
        {"limit": f"{limits.requests_per_minute:g}", "per": "minute", "burst": f"{capacity:g}"},
    )


class Limiter(Protocol):
    """What the gateway needs of a rate limiter, wherever its buckets live."""

    async def acquire(self, key: ApiKey) -> None:
        """Take one request from the key's budget or raise RESOURCE_EXHAUSTED with RetryInfo."""
        ...

    def charge(self, key: ApiKey, tokens: int) -> None:
        """Charge the key for tokens a backend reported (never raises, never waits)."""
        ...

    async def start(self) -> None:
        """Reach the store, if any (called once the gateway is built; never raises)."""
        ...

    async def close(self) -> None: ...


# How often the local limiter drops the buckets that have refilled (seconds of its clock).
SWEEP_SECONDS = 60.0


class RateLimiter:
    """The buckets in this process: each gateway limits on its own. Buckets that have refilled
    are dropped (a missing bucket is a full one), so they number the keys active lately, not
    every identity ever seen (JWT subjects are unbounded)."""

    def __init__(self, default: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._default = default
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._swept = clock()
        self.rejections = 0

    @property
    def bucket_count(self) -> int:
        return len(self._requests) + len(self._tokens)

    def sweep(self, now: float) -> None:
        """Drop every bucket that has refilled by `now`, at most once per SWEEP_SECONDS."""
        if now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        for table in (self._requests, self._tokens):
            full = [name for name, b in table.items() if b.level + (now - b.updated) * b.rate >= b.capacity]
            for name in full:
                del table[name]

    def limits_for(self, key: ApiKey) -> RateLimits:
        return effective_limits(self._default, key)

    def _bucket(
        self, table: dict[str, TokenBucket], name: str, capacity: float, per_minute: float
    ) -> TokenBucket:
        now = self._clock()
        self.sweep(now)
        bucket = table.get(name)
        if bucket is None or bucket.capacity != capacity or bucket.rate != per_minute / 60.0:
            bucket = TokenBucket(capacity, per_minute / 60.0, capacity, now)
            table[name] = bucket
        bucket.refill(now)
        return bucket

    def admit(self, key: ApiKey) -> None:
        """Take one request from the key's budget or raise RESOURCE_EXHAUSTED."""
        try:
            self._admit(key)
        except GatewayError:
            self.rejections += 1
            RATE_LIMITED.labels(key.name).inc()
            raise

    def _admit(self, key: ApiKey) -> None:
        limits = self.limits_for(key)
        if limits.tokens_per_minute > 0:
            tokens = self._bucket(self._tokens, key.name, limits.tokens_per_minute, limits.tokens_per_minute)
            if tokens.level <= 0:
                raise token_refusal(key, limits, tokens.wait_for(1.0))
        if limits.requests_per_minute > 0:
            capacity = request_capacity(limits)
            requests = self._bucket(self._requests, key.name, capacity, limits.requests_per_minute)
            if requests.level < 1.0:
                raise request_refusal(key, limits, requests.wait_for(1.0))
            requests.level -= 1.0

    async def acquire(self, key: ApiKey) -> None:
        self.admit(key)

    def charge(self, key: ApiKey, tokens: int) -> None:
        if tokens > 0:
            TOKENS.labels(key.name).inc(tokens)
        self.take_tokens(key, tokens)

    def take_tokens(self, key: ApiKey, tokens: int) -> None:
        """Take `tokens` from the key's token bucket (no metric: the caller counted them)."""
        limits = self.limits_for(key)
        if limits.tokens_per_minute > 0 and tokens > 0:
            bucket = self._bucket(self._tokens, key.name, limits.tokens_per_minute, limits.tokens_per_minute)
            bucket.level -= tokens

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


_limiter: contextvars.ContextVar[Limiter | None] = contextvars.ContextVar("limiter", default=None)


def charge_tokens(tokens: int) -> None:
    """Charge the current call's key for tokens a backend reported."""
    limiter = _limiter.get()
    if limiter is not None:
        limiter.charge(current_key.get(), tokens)


class RateLimiting(BehaviorWrapper):
    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def limited(request: Any, context: Context) -> Any:
            await self._limiter.acquire(current_key.get())
            _limiter.set(self._limiter)
            return await behavior(request, context)

        return limited

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def limited(request: Any, context: Context) -> AsyncIterator[Any]:
            await self._limiter.acquire(current_key.get())
            _limiter.set(self._limiter)
            async for item in behavior(request, context):
                yield item

        return limited
