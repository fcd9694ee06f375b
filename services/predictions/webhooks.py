"""Webhook delivery: URL checks, the signing secret, and the sender that drains the store's outbox
with Standard Webhooks signatures, retrying with capped exponential backoff and full jitter."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import logging
import math
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter, Histogram
from standardwebhooks import Webhook

from services.predictions.records import Delivery, Store

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
USER_AGENT = "inference-stack-predictions"
# How long resolving a webhook host may take before the URL is refused.
RESOLVE_TIMEOUT_SECONDS = 5.0
# The first retry waits up to this long; each later one doubles it (before the cap and the jitter).
FIRST_BACKOFF_SECONDS = 1.0
# NAT64's well-known prefix embeds an IPv4 address in its last 32 bits (RFC 6052).
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

DELIVERIES = Counter(
    "predictions_webhook_deliveries_total",
    "Webhook delivery attempts, by event and outcome (delivered, retried, abandoned).",
    ["event", "outcome"],
)
DELIVERY_SECONDS = Histogram(
    "predictions_webhook_delivery_seconds",
    "Time of one webhook delivery attempt, from connecting to the response status.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


@dataclass(frozen=True)
class WebhookSettings:
    """How the sender retries and paces deliveries."""

    # A delivery is retried until this long after its event was enqueued, then abandoned.
    retry_seconds: float = 3600.0
    max_backoff_seconds: float = 300.0
    timeout_seconds: float = 10.0
    poll_seconds: float = 0.5
    concurrency: int = 16
    # Loopback and private receivers (tests, `make run`); the URL is re-checked on every attempt.
    allow_private: bool = False


def new_secret() -> str:
    """A fresh signing secret in the form standardwebhooks.Webhook takes: "whsec_" + base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what gets reached."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(text: str) -> str | None:
    """Why a webhook may not go to this IP address (None when it is a public unicast one)."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        return f"{text!r} is not an IP address"
    if isinstance(address, ipaddress.IPv6Address):
        # Checking the IPv4 address itself: the IPv6 forms are all "reserved" or "global" as such.
        address = _embedded_ipv4(address) or address
    kinds = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-public", not address.is_global),
    )
    for kind, hit in kinds:
        if hit:
            return f"webhook host resolves to a {kind} address ({text}); only public addresses are allowed"
    return None


def _url_syntax_problem(url: str) -> str | None:
    """Why `url` is not an acceptable webhook URL on its face (None when it is)."""
    if len(url) > MAX_URL_LENGTH:
        return f"webhook URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}"
    try:
        parts = urlsplit(url)
        _ = parts.port
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        return f"webhook URL is not valid: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"webhook URL must use http or https, not {parts.scheme or 'no scheme'!r}"
    if not parts.hostname or not parsed.raw_host:
        return "webhook URL has no host"
    # Both parsers must agree there is no userinfo: a disagreement is how URLs smuggle a host.
    if parts.username is not None or parts.password is not None or parsed.userinfo:
        return "webhook URL must not contain credentials"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "webhook URL must not contain spaces or control characters"
    return None


async def _resolve(url: httpx.URL) -> list[str]:
    """The addresses `url`'s host stands for, in getaddrinfo's preference order; raises OSError
    or TimeoutError."""
    host = url.raw_host.decode("ascii")
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS
    )
    # IPv6 socket addresses may carry a zone ("fe80::1%eth0"); the address is what is checked.
    addresses = [str(info[4][0]).split("%", 1)[0] for info in infos]
    if not addresses:
        raise OSError("no address")
    return list(dict.fromkeys(addresses))


def _resolve_failure(url: httpx.URL, exc: Exception) -> str:
    detail = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
    return f"webhook host {url.host!r} does not resolve: {detail}"


def _addresses_problem(addresses: list[str]) -> str | None:
    for address in addresses:
        problem = address_problem(address)
        if problem:
            return problem
    return None


async def webhook_url_problem(url: str, allow_private: bool) -> str | None:
    """None when `url` may receive webhooks, else the reason: http(s) with a host, no credentials,
    at most 2048 characters; unless `allow_private`, every address the host resolves to is public."""
    problem = _url_syntax_problem(url)
    if problem or allow_private:
        return problem
    parsed = httpx.URL(url)
    try:
        addresses = await _resolve(parsed)
    except (OSError, TimeoutError, UnicodeError) as exc:
        return _resolve_failure(parsed, exc)
    return _addresses_problem(addresses)


def pinned(url: httpx.URL, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """The request target that connects to `address` (already checked) while the receiver still
    sees `url`'s host: the URL with the address, the Host header, and the TLS server name."""
    extensions: dict[str, Any] = (
        {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    )
    return url.copy_with(host=address), {"host": url.netloc.decode("ascii")}, extensions


def backoff_seconds(attempt: int, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, 1 s * 2**(attempt-1))] after the `attempt`-th failure."""
    ceiling = min(cap, FIRST_BACKOFF_SECONDS * 2 ** min(max(attempt - 1, 0), 62))
    return random.uniform(0.0, ceiling)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; the store writes them in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Outcome:
    """What one attempt came to: delivered, retry (after at least `wait` s), or abandon."""

    kind: str
    reason: str = ""
    wait: float | None = None


class WebhookSender:
    """Sends due outbox deliveries (up to `settings.concurrency` at once), signed with `secret`,
    and records each outcome in the store; never raises out of its loop."""

    def __init__(self, store: Store, secret: str, worker: str, settings: WebhookSettings) -> None:
        self.store = store
        self.worker = worker
        self.settings = settings
        self._signer = Webhook(secret)
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max(settings.concurrency, 1))
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def lock_seconds(self) -> float:
        """How long a fetched delivery stays locked to this worker: longer than one attempt (the
        URL check, the bounded send, the store update), short enough that a dead replica's
        deliveries are soon sent by another."""
        return RESOLVE_TIMEOUT_SECONDS + self.settings.timeout_seconds + 5.0

    async def start(self) -> None:
        """Starts the background loop (idempotent)."""
        if self._loop_task is not None:
            return
        self._client = httpx.AsyncClient(
            timeout=self.settings.timeout_seconds,
            follow_redirects=False,
            # Webhooks go straight to the checked address, never through an environment proxy.
            trust_env=False,
            headers={"user-agent": USER_AGENT},
            limits=httpx.Limits(max_connections=max(self.settings.concurrency, 1)),
        )
        self._loop_task = asyncio.create_task(self._run(), name="webhook-sender")

    def wake(self) -> None:
        """Looks for due deliveries now instead of at the next poll."""
        self._wakeup.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stops polling, lets in-flight sends finish for up to `grace` s, cancels the rest (their
        locks expire and another attempt sends them with the same webhook-id)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        pending = list(self._in_flight.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            full = False
            try:
                full = await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook sender: polling the outbox failed")
            if full:
                # A full batch: more may be due; look again as soon as a slot frees.
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.settings.poll_seconds)
            self._wakeup.clear()

    async def _poll_once(self) -> bool:
        """Fetches as many due deliveries as there are free slots and starts sending them; True
        when it filled every free slot."""
        await self._slots.acquire()
        self._slots.release()
        free = max(self.settings.concurrency, 1) - len(self._in_flight)
        if free <= 0:
            return False
        due = await self.store.due_deliveries(self.worker, free, self.lock_seconds)
        started = 0
        for delivery in due:
            # A lock that expired during a very slow attempt must not start a second send here.
            if delivery.id in self._in_flight:
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._send(delivery), name=f"webhook-{delivery.id}")
            self._in_flight[delivery.id] = task
            task.add_done_callback(functools.partial(self._done, delivery.id))
            started += 1
        return started > 0 and len(due) >= free

    def _done(self, delivery_id: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(delivery_id, None)
        self._slots.release()

    async def _send(self, delivery: Delivery) -> None:
        try:
            outcome = await self._attempt(delivery)
            await self._record(delivery, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lock expires and the delivery is attempted again.
            log.exception("webhook sender: delivery %s failed unexpectedly", delivery.id)

    async def _attempt(self, delivery: Delivery) -> _Outcome:
        problem = _url_syntax_problem(delivery.url)
        if problem:
            return _Outcome("abandon", problem)
        url = httpx.URL(delivery.url)
        try:
            addresses = await _resolve(url)
        except (OSError, TimeoutError, UnicodeError) as exc:
            # Unlike at create time, a failing lookup may be a passing DNS outage.
            return _Outcome("retry", _resolve_failure(url, exc))
        if not self.settings.allow_private:
            problem = _addresses_problem(addresses)
            if problem:
                return _Outcome("abandon", problem)
        now = datetime.now(UTC)
        body = delivery.body.encode("utf-8")
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": self._signer.sign(delivery.id, now, body),
        }
        began = time.perf_counter()
        try:
            # The whole attempt is bounded, not just each read, so a trickling receiver cannot hold it.
            async with asyncio.timeout(self.settings.timeout_seconds):
                status, retry_after = await self._post(url, addresses, body, headers)
        except (TimeoutError, httpx.TimeoutException):
            return _Outcome("retry", f"timed out after {self.settings.timeout_seconds:g} s")
        except httpx.TransportError as exc:
            return _Outcome("retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except httpx.HTTPError as exc:
            # An invalid URL or header: trying again cannot help.
            return _Outcome("abandon", f"{type(exc).__name__}: {exc}")
        finally:
            DELIVERY_SECONDS.observe(time.perf_counter() - began)
        if 200 <= status < 300:
            return _Outcome("delivered")
        if status >= 500 or status == 429:
            wait = retry_after_seconds(retry_after, now) if status in (429, 503) else None
            return _Outcome("retry", f"HTTP {status}", wait)
        return _Outcome("abandon", f"HTTP {status}")

    async def _post(
        self, url: httpx.URL, addresses: list[str], body: bytes, headers: dict[str, str]
    ) -> tuple[int, str | None]:
        """POSTs to the first of `addresses` that accepts a connection. Connecting to the checked
        address itself, not the name, leaves DNS no second answer to point at a private one."""
        assert self._client is not None
        for index, address in enumerate(addresses):
            target, host, extensions = pinned(url, address)
            try:
                async with self._client.stream(
                    "POST", target, content=body, headers={**headers, **host}, extensions=extensions
                ) as reply:
                    # The body is never read: only the status matters, and it may be large.
                    return reply.status_code, reply.headers.get("retry-after")
            except httpx.ConnectError:
                if index == len(addresses) - 1:
                    raise
        raise AssertionError("unreachable: _resolve returns at least one address")

    async def _record(self, delivery: Delivery, outcome: _Outcome) -> None:
        if outcome.kind == "delivered":
            await self.store.delivered(delivery.id)
            DELIVERIES.labels(delivery.event, "delivered").inc()
            return
        # The store counts an attempt when it hands the delivery out (1 = the first).
        attempt = max(delivery.attempts, 1)
        if outcome.kind == "retry":
            now = datetime.now(UTC)
            deadline = _aware(delivery.created_at) + timedelta(seconds=self.settings.retry_seconds)
            delay = backoff_seconds(attempt, self.settings.max_backoff_seconds)
            if outcome.wait is not None:
                delay = max(delay, outcome.wait)
            next_at = now + timedelta(seconds=delay)
            if now < deadline and (outcome.wait is None or next_at <= deadline):
                # One last attempt at the deadline rather than giving up up to a backoff early.
                await self.store.retry_delivery(delivery.id, min(next_at, deadline), outcome.reason)
                DELIVERIES.labels(delivery.event, "retried").inc()
                log.info(
                    "webhook %s (%s) attempt %d failed: %s; retrying",
                    delivery.id,
                    delivery.event,
                    attempt,
                    outcome.reason,
                )
                return
            reason = f"{outcome.reason}; gave up after {self.settings.retry_seconds:g} s of retries"
            outcome = _Outcome("abandon", reason)
        await self.store.abandon_delivery(delivery.id, outcome.reason)
        DELIVERIES.labels(delivery.event, "abandoned").inc()
        log.warning(
            "webhook %s (%s) to %s abandoned: %s", delivery.id, delivery.event, delivery.url, outcome.reason
        )
