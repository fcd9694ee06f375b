"""Rate limits shared by every gateway: each key's buckets live in Redis and every check is one
atomic Lua script (refill by Redis's own clock, take one request, answer admitted or the wait), so
with N gateways a key still gets its limit once. While Redis fails or does not answer, the gateway
limits on its own buckets (a `RateLimiter`), logs once per outage, and tries Redis again after a
short backoff."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError

from services.gateway.auth import ApiKey
from services.gateway.metrics import RATE_LIMIT_FALLBACKS, RATE_LIMIT_STORE_UP, RATE_LIMITED, TOKENS
from services.gateway.ratelimit import (
    RateLimiter,
    RateLimits,
    effective_limits,
    request_capacity,
    request_refusal,
    token_refusal,
)

log = logging.getLogger(__name__)

STORE = "redis"

# Shared by both scripts. A bucket is a hash {level, at}; a missing one is full, so a key expires
# once it would have refilled (PEXPIRE), and idle keys cost Redis nothing. TIME is Redis's clock:
# the gateways' clocks never meet. (Scripts that write after TIME need effects replication, the
# default since Redis 5.)
_BUCKETS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local function expiry(level, capacity, rate)
  return math.ceil((capacity - level) / rate * 1000) + 1000
end

-- A read bucket's expiry is set again from the current rate: after a key's rate is lowered, an
-- expiry from the old, faster rate would drop a bucket that is not yet full.
local function refilled(key, capacity, rate)
  local stored = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(stored[1]), tonumber(stored[2])
  if level == nil or at == nil then
    return capacity
  end
  local current = math.min(capacity, level + math.max(0, now - at) * rate)
  redis.call('PEXPIRE', key, expiry(current, capacity, rate))
  return current
end

local function store(key, level, capacity, rate)
  redis.call('HSET', key, 'level', string.format('%.17g', level), 'at', string.format('%.17g', now))
  redis.call('PEXPIRE', key, expiry(level, capacity, rate))
end
"""

# KEYS: the key's request bucket, its token bucket. ARGV: request capacity and refill per second,
# token capacity and refill per second (a rate of 0: no such limit).
# Answers {0, "0"} admitted, {1, wait} over the request limit, {2, wait} over the token limit.
CHECK_SCRIPT = (
    _BUCKETS
    + """
local request_capacity, request_rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local token_capacity, token_rate = tonumber(ARGV[3]), tonumber(ARGV[4])
if token_rate > 0 then
  local tokens = refilled(KEYS[2], token_capacity, token_rate)
  if tokens <= 0 then
    return {2, string.format('%.6f', (1 - tokens) / token_rate)}
  end
end
if request_rate > 0 then
  local requests = refilled(KEYS[1], request_capacity, request_rate)
  if requests < 1 then
    return {1, string.format('%.6f', (1 - requests) / request_rate)}
  end
  store(KEYS[1], requests - 1, request_capacity, request_rate)
end
return {0, '0'}
"""
)

# KEYS: the key's token bucket. ARGV: its capacity, refill per second, the tokens to take.
CHARGE_SCRIPT = (
    _BUCKETS
    + """
local capacity, rate, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
store(KEYS[1], refilled(KEYS[1], capacity, rate) - amount, capacity, rate)
return 1
"""
)

ADMITTED, OVER_REQUESTS, OVER_TOKENS = 0, 1, 2

# A reply that does not parse (a foreign script under our SHA, a proxy in the way) is a store
# failure too: the check falls back, never a 500.
_STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError, IndexError, TypeError, ValueError)

# Connections opened by `start`, so that the first burst does not connect (and time out) at once.
WARM_CONNECTIONS = 8
# `start` may wait this long at least: a gateway's first connection is slower than a check.
START_TIMEOUT = 1.0


def _pool_wait(error: BaseException) -> bool:
    """Whether `error` says only that no pooled connection was free (Redis itself was not asked)."""
    if isinstance(error, MaxConnectionsError):
        return True
    return isinstance(error, RedisConnectionError) and isinstance(error.__cause__, asyncio.TimeoutError)


def verdict(answer: Any) -> tuple[int, float]:
    """The check script's answer as (code, wait); ValueError, IndexError or TypeError if it is not one."""
    code, wait = int(answer[0]), float(answer[1])
    if code not in (ADMITTED, OVER_REQUESTS, OVER_TOKENS) or wait < 0:
        raise ValueError(f"unexpected rate-limit script answer {answer!r}")
    return code, wait


def bucket_keys(prefix: str, name: str) -> tuple[str, str]:
    """The Redis keys of an API key's request and token buckets: its name, never its secret; the
    name in braces keeps both in one Redis Cluster slot."""
    return f"{prefix}{{{name}}}:requests", f"{prefix}{{{name}}}:tokens"


def redacted(url: str) -> str:
    """`url` without its user and password, for the log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class RedisRateLimiter:
    """A `Limiter` whose buckets live in Redis at `url`, under `prefix`. A check (waiting for one of
    `max_connections` connections included) may take `timeout` seconds; after a Redis failure the
    local buckets serve for `retry_seconds`, then one check at a time probes Redis."""

    def __init__(
        self,
        default: RateLimits,
        url: str,
        prefix: str = "inference:ratelimit:",
        timeout: float = 1.0,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = 64,
    ) -> None:
        self._default = default
        self._prefix = prefix
        self._timeout = timeout
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._where = redacted(url)
        self._max_connections = max_connections
        self.fallback = RateLimiter(default, clock)
        # Calls beyond max_connections queue for a connection (the default pool would refuse them
        # with MaxConnectionsError). The semaphore is that queue, held outside the pool so that a
        # check that timed out waiting in it is told apart from one Redis did not answer. No
        # retries inside redis-py: a failed call falls back at once, and the backoff is ours.
        # Each call is bounded as a whole (asyncio.timeout in `_call`); the pool's and sockets'
        # own timeouts are only a backstop, long enough for `start`.
        self._slots = asyncio.Semaphore(max_connections)
        backstop = max(timeout, START_TIMEOUT)
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=backstop,
            socket_timeout=backstop,
            socket_connect_timeout=backstop,
            retry=Retry(NoBackoff(), 0),
            client_name="inference-gateway",
        )
        self._client = redis.asyncio.Redis.from_pool(pool)
        self._check = self._client.register_script(CHECK_SCRIPT)
        self._charge = self._client.register_script(CHARGE_SCRIPT)
        self.up = True
        # Bumped by each failure of a current call: only a probe sent after the latest failure
        # may mark Redis up, and late answers of calls sent before it change nothing.
        self._generation = 0
        self._down_since = 0.0
        self._retry_at = 0.0
        self._probing = False
        self.pool_waits = 0
        self._charges: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open a few connections and load the scripts, so that the first burst finds them ready;
        the log and the store-up metric then say whether Redis answers."""

        async def warm() -> bool:
            count = min(self._max_connections, WARM_CONNECTIONS)
            await asyncio.gather(*(self._client.ping() for _ in range(count)))
            await self._client.script_load(CHECK_SCRIPT)
            await self._client.script_load(CHARGE_SCRIPT)
            return True

        if await self._call(warm, seconds=max(self._timeout, START_TIMEOUT)) is not None:
            RATE_LIMIT_STORE_UP.labels(STORE).set(1)
            log.info("rate limits are shared in Redis at %s", self._where)

    async def acquire(self, key: ApiKey) -> None:
        limits = effective_limits(self._default, key)
        if limits.requests_per_minute <= 0 and limits.tokens_per_minute <= 0:
            return
        requests, tokens = bucket_keys(self._prefix, key.name)
        args = (
            request_capacity(limits),
            max(limits.requests_per_minute, 0.0) / 60.0,
            limits.tokens_per_minute,
            max(limits.tokens_per_minute, 0.0) / 60.0,
        )
        answer = await self._script(self._check, [requests, tokens], args, verdict)
        if answer is None:
            self.fallback.admit(key)
            return
        code, wait = answer
        if code == ADMITTED:
            return
        RATE_LIMITED.labels(key.name).inc()
        if code == OVER_TOKENS:
            raise token_refusal(key, limits, wait)
        raise request_refusal(key, limits, wait)

    def charge(self, key: ApiKey, tokens: int) -> None:
        if tokens <= 0:
            return
        TOKENS.labels(key.name).inc(tokens)
        limits = effective_limits(self._default, key)
        if limits.tokens_per_minute <= 0:
            return
        # Called from synchronous code on the gateway's loop: the charge runs beside the reply.
        task = asyncio.get_running_loop().create_task(self._take_tokens(key, limits, tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def _take_tokens(self, key: ApiKey, limits: RateLimits, tokens: int) -> None:
        _, bucket = bucket_keys(self._prefix, key.name)
        args = (limits.tokens_per_minute, limits.tokens_per_minute / 60.0, tokens)
        if await self._script(self._charge, [bucket], args) is None:
            self.fallback.take_tokens(key, tokens)

    async def drain(self) -> None:
        """Wait (at most a second) for the token charges still on their way to Redis."""
        if self._charges:
            await asyncio.wait(set(self._charges), timeout=1.0)

    async def close(self) -> None:
        await self.drain()
        await self._client.aclose()

    async def _script(
        self,
        script: Any,
        keys: Sequence[str],
        args: Sequence[float],
        parse: Callable[[Any], Any] = lambda answer: answer,
    ) -> Any | None:
        async def run() -> Any:
            return parse(await script(keys=list(keys), args=[repr(float(a)) for a in args]))

        answer = await self._call(run)
        if answer is None:
            RATE_LIMIT_FALLBACKS.labels(STORE).inc()
        return answer

    async def _call(self, call: Callable[[], Awaitable[Any]], seconds: float | None = None) -> Any | None:
        """`call()`'s answer within `seconds` (a check's timeout by default), or None when Redis
        is down (after a failure, until the backoff ends; then one call at a time probes it),
        fails now, or no connection came free in time (that one call only: Redis was not asked)."""
        if not self.up and (self._probing or self._clock() < self._retry_at):
            return None
        generation = self._generation
        probing = not self.up
        if probing:
            self._probing = True
        queued = True
        try:
            async with asyncio.timeout(self._timeout if seconds is None else seconds):
                async with self._slots:
                    queued = False
                    answer = await call()
        except _STORE_ERRORS as error:
            if queued or _pool_wait(error):
                self.pool_waits += 1
            else:
                self._failed(error, generation)
            return None
        finally:
            if probing:
                self._probing = False
        if probing:
            self._answered(generation)
        return answer

    def _failed(self, error: BaseException, generation: int) -> None:
        if generation != self._generation:
            return  # sent before the latest failure, which already counted this outage
        now = self._clock()
        self._generation += 1
        self._retry_at = now + self._retry_seconds
        if self.up:
            self.up = False
            self._down_since = now
            RATE_LIMIT_STORE_UP.labels(STORE).set(0)
            log.warning(
                "Redis at %s failed (%s: %s): rate limits are this gateway's own until it answers "
                "(tried again every %gs)",
                self._where,
                type(error).__name__,
                error,
                self._retry_seconds,
            )

    def _answered(self, generation: int) -> None:
        if self.up or generation != self._generation:
            return
        self.up = True
        RATE_LIMIT_STORE_UP.labels(STORE).set(1)
        log.info(
            "Redis at %s answers again after %.1fs: rate limits are shared again",
            self._where,
            self._clock() - self._down_since,
        )
