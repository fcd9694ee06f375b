"""Channels to the backend replicas and the calls the gateway makes on them: one pool per served model
(discovered with ListServedModels on every replica), the pool's routing policy choosing among the
replicas that are up (health-watched), unary calls and not-yet-started streams retried on UNAVAILABLE
or RESOURCE_EXHAUSTED on another replica; calls carry the client's remaining deadline and filtered
metadata, and a stream is cancelled as soon as the client goes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

from services.common import keepalive, sampling, tls
from services.common.errors import error_info, retry_info
from services.common.interceptors import Context
from services.common.methods import unary_methods
from services.common.model_names import aliases
from services.gateway import routing
from services.gateway.errors import ERROR_DOMAIN, STATUS_DETAILS_KEY, GatewayError
from services.gateway.metrics import BACKEND_ERRORS, CACHE_HITS, CACHE_MISSES
from services.gateway.ratelimit import charge_tokens

log = logging.getLogger(__name__)

ResponseT = TypeVar("ResponseT", bound=Message)
T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Reconnect backoff of every channel to a replica. gRPC's defaults (1 s, growing 1.6x up to 120 s)
# left a replica restarted after a crash unused for 28 s after it served again; with these a
# replica that comes back is connected to within about a second.
INITIAL_RECONNECT_BACKOFF_MS = 250
MAX_RECONNECT_BACKOFF_MS = 1000
# gRPC's min_reconnect_backoff_ms is the deadline of one connection attempt (default 20 s): an
# address that swallows packets is given up on and tried again this soon.
MIN_RECONNECT_BACKOFF_MS = 2000
# A dns:/// target is resolved again at most this often when its addresses change (gRPC: 30 s).
DNS_MIN_RERESOLUTION_MS = 5000
# A replica whose call just failed with UNAVAILABLE is passed over for this long (its health watch
# usually says why sooner), so that the retry and the next requests go to the others.
FAILURE_COOLDOWN_S = 1.0
# Pause before watching a replica's health again after its watch ended.
WATCH_RETRY_S = 0.25
# The longest such pause (a watch that keeps failing, or a replica with no health service).
WATCH_RETRY_MAX_S = 2.0
# Pause before retrying a call on a replica that already failed it (only one replica is left).
RETRY_BACKOFF_S = 0.05
# The retry delay a client is told when its stream was cut by a lost replica.
RETRY_AFTER_CUT_S = 1.0
# How long one replica may take to list its models before the gateway keeps its last listing.
DISCOVERY_TIMEOUT_S = 3.0
# Without any listing yet, a request asks the replicas for one at most this often.
DISCOVERY_RETRY_S = 1.0
# The longest a fanned-out call (preload, clear, cache status, counters) waits for one replica when
# the client set no deadline: a replica that hangs is reported with its error, not waited on forever.
FAN_OUT_TIMEOUT_S = 5.0

# Only these headers reach the backends; cookies, credentials, Envoy's and the proxies' headers do
# not. Trace headers are re-created by the tracing interceptor when tracing is on.
FORWARDED_HEADERS = frozenset({"x-request-id", "traceparent", "tracestate", "baggage"})
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

# Only unary calls are retried: a stream that already delivered messages is never replayed.
UNARY_METHODS = unary_methods(generation_pb2.DESCRIPTOR, embedding_pb2.DESCRIPTOR, info_pb2.DESCRIPTOR)


def grpc_target(addresses: str) -> tuple[str, list[str]]:
    """The channel target for a comma list of host:port (or a target with a scheme such as
    dns:///name:port), and the replica addresses it names (the target itself when it is a name)."""
    text = addresses.strip()
    if ":///" in text or text.startswith(("ipv4:", "ipv6:", "unix:")):
        return text, [text]
    replicas = [item.strip() for item in text.split(",") if item.strip()]
    if len(replicas) == 1:
        return replicas[0], replicas
    resolved = [_resolve(item) for item in replicas]
    if all(":" not in host for host, _ in resolved):
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in resolved), replicas
    return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in resolved), replicas


def _resolve(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        info = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        return str(info[0][4][0]), port


def service_config(attempts: int) -> str:
    names = [
        {"service": service, "method": method}
        for service, methods in UNARY_METHODS.items()
        for method in methods
    ]
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    if attempts > 1:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": min(attempts, 5),
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def reconnect_options() -> list[tuple[str, int]]:
    """Channel options that bring a replica back within about a second of it listening again."""
    return [
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def channel_options(attempts: int) -> list[tuple[str, Any]]:
    """Options of the one channel to a name target (dns:///...): gRPC balances, health-checks and
    retries over the addresses the name resolves to."""
    return [
        ("grpc.service_config", service_config(attempts)),
        ("grpc.enable_retries", 1 if attempts > 1 else 0),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RERESOLUTION_MS),
        *replica_channel_options(),
    ]


def replica_channel_options() -> list[tuple[str, Any]]:
    """Options of a channel to one replica (the gateway picks the replica and retries itself)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *reconnect_options(),
        *keepalive.client_options(),
    ]


def dns_name(target: str) -> tuple[str, str] | None:
    """The host and port of a dns:///host:port (or dns://authority/host:port) target, else None."""
    if not target.startswith("dns:"):
        return None
    name = target.removeprefix("dns:").lstrip("/")
    if target.startswith("dns://") and not target.startswith("dns:///"):
        name = name.partition("/")[2]
    host, _, port = name.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, port


def is_name_target(target: str) -> bool:
    """Whether `target` is a name or address list that gRPC resolves itself (a scheme such as dns:///)."""
    return ":///" in target or target.startswith(("ipv4:", "ipv6:", "unix:"))


class ResponseCache:
    """A bounded LRU of responses to deterministic requests, keyed by method and the request's
    canonical (deterministic) serialization; a hit gets a request_id of its own ("cached-...")."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def get(self, method: str, request: Message, kind: type[ResponseT]) -> ResponseT | None:
        if self.size <= 0:
            return None
        key = (method, request.SerializeToString(deterministic=True))
        stored = self._entries.get(key)
        if stored is None:
            self.misses += 1
            CACHE_MISSES.labels(method).inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        CACHE_HITS.labels(method).inc()
        response = kind.FromString(stored)
        # An answer from the cache is still a request of its own: it must not repeat the id of
        # the request that filled the entry.
        if "request_id" in response.DESCRIPTOR.fields_by_name:
            setattr(response, "request_id", f"cached-{uuid.uuid4().hex[:16]}")  # noqa: B010
        return response

    def put(self, method: str, request: Message, response: Message) -> None:
        if self.size <= 0:
            return
        self._entries[(method, request.SerializeToString(deterministic=True))] = response.SerializeToString()
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count

    def __len__(self) -> int:
        return len(self._entries)


GenerationRequest = (
    generation_pb2.GenerateRequest
    | generation_pb2.ChatRequest
    | generation_pb2.SolveMathRequest
    | generation_pb2.SolveCodingRequest
)


def is_deterministic(request: GenerationRequest) -> bool:
    """Whether the same request always gets the same answer (so its response may be cached)."""
    return sampling.is_deterministic(request.parameters)


def call_options(context: Context, tracing: bool) -> tuple[float | None, tuple[tuple[str, str], ...]]:
    """The client's remaining deadline and the metadata the backends may see."""
    dropped = TRACE_HEADERS if tracing else frozenset()
    metadata = tuple(
        (key, value)
        for key, value in (context.invocation_metadata() or ())
        if key in FORWARDED_HEADERS and key not in dropped and isinstance(value, str)
    )
    return context.time_remaining(), metadata


def _usage_tokens(response: Message) -> int:
    if "usage" in response.DESCRIPTOR.fields_by_name and response.HasField("usage"):
        return int(getattr(response, "usage").total_tokens)  # noqa: B009
    return 0


# The health a replica's watch last saw: grpc.health.v1 status names, plus these two.
UNCHECKED = "UNCHECKED"  # not known yet, or the replica serves no health service: calls decide
UNREACHABLE = "UNREACHABLE"  # its watch broke off (the connection was lost)
SERVING = "SERVING"

StubT = TypeVar("StubT")
RoutableT = TypeVar("RoutableT", bound=routing.Routable)
ChannelFactory = Callable[[str, list[tuple[str, Any]], list[Any]], grpc.aio.Channel]


def tls_channel_factory(files: tls.TlsFiles) -> ChannelFactory:
    """Channels with `files`' credentials: TLS when they hold a CA, plaintext otherwise."""

    def make(target: str, options: list[tuple[str, Any]], interceptors: list[Any]) -> grpc.aio.Channel:
        return tls.aio_channel(target, files, options=options, interceptors=interceptors)

    return make


class Replica:
    """One replica as the round-robin pick sees it: its channel, the health its watch last reported
    and a short cool-down after a call to it failed with UNAVAILABLE."""

    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel,
        watched: bool = True,
        target: str = "",
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.address = address
        self.channel = channel
        self.watched = watched
        # The channel's target and options when they are not the address and the backend's own
        # (an address a dns:/// name resolved to), so that a reload makes the same channel.
        self.target = target or address
        self.options = options
        self.health = UNCHECKED
        self.failed_until = 0.0
        # Calls this gateway has in flight on the replica, and its last load report (routing.py).
        self.outstanding = 0
        self.load_report: routing.LoadReport | None = None
        # Called when the replica starts serving (its backend asks it what it serves then).
        self.on_serving: Callable[[], None] | None = None
        self._stubs: dict[type[Any], Any] = {}

    def replace_channel(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        """Uses `channel` from now on (new certificates); returns the old one, still open."""
        old, self.channel = self.channel, channel
        self._stubs = {}
        return old

    def stub(self, kind: Callable[[grpc.aio.Channel], StubT]) -> StubT:
        if kind not in self._stubs:
            self._stubs[kind] = kind(self.channel)  # type: ignore[index]
        stub: StubT = self._stubs[kind]  # type: ignore[index]
        return stub

    def available(self, now: float) -> bool:
        """Serving as far as the gateway knows: health not NOT_SERVING or lost, no recent failed call,
        and its channel not failing to connect."""
        if self.health not in (UNCHECKED, SERVING) or now < self.failed_until:
            return False
        return self.channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def failed(self, now: float) -> None:
        self.failed_until = now + FAILURE_COOLDOWN_S

    def set_health(self, health: str, backend: str = "") -> None:
        if health != self.health:
            log.info("%s replica %s: %s -> %s", backend or "backend", self.address, self.health, health)
        serving_now = health == SERVING and self.health != SERVING
        if serving_now:
            # The replica says it serves again: take it back now, not when the cool-down ends.
            self.failed_until = 0.0
        self.health = health
        if serving_now and self.on_serving is not None:
            self.on_serving()

    async def watch(self, backend: str = "") -> None:
        """Follow the replica's grpc.health.v1 status until cancelled; while the replica is down the
        watch waits for its channel to reconnect (within the reconnect backoff). Any failure of the
        watch marks the replica unreachable (or unchecked, with no health service) and it starts
        again after a pause that grows up to WATCH_RETRY_MAX_S; a reloaded channel is watched at once."""
        pause = WATCH_RETRY_S
        while True:
            channel = self.channel
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True):
                    self.set_health(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), backend)
                    pause = WATCH_RETRY_S
                    if self.channel is not channel:
                        break  # watch on the new channel (new certificates) at once
                else:
                    self.set_health(UNREACHABLE, backend)
            except grpc.aio.AioRpcError as error:
                if self.channel is not channel:
                    continue  # the old channel was closed after a reload: not the replica's fault
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # No health service (yet: a replica may be replaced by one that has it): calls
                    # decide, and the watch asks again now and then.
                    self.set_health(UNCHECKED, backend)
                    pause = WATCH_RETRY_MAX_S
                else:
                    self.set_health(UNREACHABLE, backend)
            except Exception:
                # A watch that died silently would leave the replica's last health standing for good.
                log.exception("%s replica %s: health watch failed", backend or "backend", self.address)
                self.set_health(UNREACHABLE, backend)
            if self.channel is not channel:
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, WATCH_RETRY_MAX_S)


class ReplicaPool:
    """The replicas of one model (or of a whole backend): its routing policy chooses among those that
    are up, skipping the ones that are down and taking them back when they serve again."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        clock: Callable[[], float] = time.monotonic,
        policy: routing.RoutingPolicy | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a backend needs at least one replica")
        self.replicas = list(replicas)
        self.policy: routing.RoutingPolicy = policy if policy is not None else routing.RoundRobin()
        self._clock = clock

    def served(self, replica: Replica, prefix: Sequence[int]) -> None:
        """`replica` answered a request with the prefix keys `prefix` (it holds them in its cache now)."""
        self.policy.served(replica, prefix)

    def pick(self, avoid: Collection[Replica] = (), prefix: Sequence[int] = ()) -> Replica:
        """The policy's choice among the available replicas not in `avoid`; else among the available
        ones; else among those not in `avoid` (the gateway's view may be stale: the call will tell);
        else among all."""
        now = self._clock()
        available = [replica for replica in self.replicas if replica.available(now)]
        fresh = [replica for replica in self.replicas if replica not in avoid]
        candidates = (
            [replica for replica in available if replica not in avoid] or available or fresh or self.replicas
        )
        return self.policy.choose(candidates, prefix)

    def untried(self, tried: Collection[Replica]) -> bool:
        """Whether an available replica is left that is not in `tried`."""
        now = self._clock()
        return any(replica not in tried and replica.available(now) for replica in self.replicas)

    def mark_failed(self, replica: Replica) -> None:
        replica.failed(self._clock())


class Backend:
    """One backend kind (generator or embedder): one channel per listed replica, each watched by a
    grpc.health.v1 Watch and followed for load reports, asked what it serves (when it starts serving
    and every `model_refresh_s`), and one pool per served model; a dns:/// target is one channel that
    gRPC itself balances, health-checks and retries over."""

    def __init__(
        self,
        name: str,
        addresses: str,
        attempts: int,
        interceptors: Sequence[Any],
        tracing: bool,
        tls_files: tls.TlsFiles = tls.PLAINTEXT,
        channel_factory: ChannelFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy_factory: Callable[[], routing.RoutingPolicy] | None = None,
        model_refresh_s: float = 10.0,
    ) -> None:
        self.name = name
        text = addresses.strip()
        named = is_name_target(text)
        # Each listed address gets its own channel, which resolves a host name itself (and again on
        # reconnection), so nothing is resolved here.
        self.replicas = [text] if named else [item.strip() for item in text.split(",") if item.strip()]
        self.target = text if named else ",".join(self.replicas)
        self.tracing = tracing
        # Renewed client certificates are picked up by new channels (checked on a pick, at most
        # once a second); with a factory of its own the caller owns its credentials.
        self._files_watch = (
            tls.FileWatch(tls_files, f"gateway -> {name}")
            if channel_factory is None and tls_files.client_tls
            else None
        )
        self._checked = clock()
        self._clock = clock
        self._interceptors = list(interceptors)
        self._named = named
        self._attempts_option = attempts
        self._closing: set[asyncio.Task[None]] = set()
        self._old_channels: set[grpc.aio.Channel] = set()
        self.reloads = 0
        if channel_factory is None:
            channel_factory = tls_channel_factory(tls_files)
        self._factory = channel_factory
        # Streams are retried by the gateway only (before their first message), in both modes.
        self.stream_attempts = attempts
        if named:
            # The channel's own retry policy retries unary calls on the name's other addresses.
            self.attempts = 1
            channel = channel_factory(self.target, channel_options(attempts), list(interceptors))
            members = [Replica(self.target, channel, watched=False)]
        else:
            self.attempts = attempts
            members = [
                Replica(address, channel_factory(address, replica_channel_options(), list(interceptors)))
                for address in self.replicas
            ]
        self._policy_factory: Callable[[], routing.RoutingPolicy] = policy_factory or routing.RoundRobin
        self.pool = ReplicaPool(members, clock, self._policy_factory())
        # What each replica last said it serves (by address), and one pool per served model id.
        self.listings: dict[str, list[info_pb2.ServedModel]] = {}
        self._union: list[info_pb2.ServedModel] | None = None
        self.model_pools: dict[str, ReplicaPool] = {}
        self.default_model = ""
        # Whether a model-less request goes to the pool of the first listed model (a generator lists
        # the one it serves) or to every replica, each applying its own default (an embedder lists
        # its cache in LRU order, so its first listed model is no default).
        self.default_from_listing = True
        self.model_refresh_s = model_refresh_s
        self._listed_at = -1e9
        self._listing = asyncio.Lock()
        self._rediscover = asyncio.Event()
        for member in members:
            member.on_serving = self._rediscover.set
        self._discovery: asyncio.Task[None] | None = None
        self._follows: dict[str, asyncio.Task[None]] = {}
        self._watch_tasks: dict[str, asyncio.Task[None]] = {}
        # A dns:///host:port target is resolved by the gateway (every refresh) into one replica per
        # address; until the first answer its one balanced channel serves.
        self._dns = dns_name(text)
        self._closed = False
        self.watch()

    @property
    def _watches(self) -> list[asyncio.Task[None]]:
        return [
            self._watch_tasks[replica.address]
            for replica in self.pool.replicas
            if replica.address in self._watch_tasks
        ]

    @property
    def replica_channels(self) -> dict[str, grpc.aio.Channel]:
        """Each replica's current channel, by address."""
        return {replica.address: replica.channel for replica in self.pool.replicas}

    def watch(self) -> None:
        """Start the replicas' health watches in the running event loop, and start again any that
        ended (a watch only ends by cancellation or a bug, and a replica must not go unwatched);
        likewise the model discovery and the load reports."""
        if self._closed:
            return
        self._follow()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        for replica in self.pool.replicas:
            task = self._watch_tasks.get(replica.address)
            if replica.watched and (task is None or task.done()):
                self._watch_tasks[replica.address] = asyncio.create_task(
                    replica.watch(self.name), name=f"watch {self.name} {replica.address}"
                )

    def _follow(self) -> None:
        """The discovery loop and each watched replica's load reports, started when not running."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._discovery is None or self._discovery.done():
            self._discovery = asyncio.create_task(self._discover(), name=f"discover {self.name}")
        for replica in self.pool.replicas:
            task = self._follows.get(replica.address)
            if replica.watched and (task is None or task.done()):
                self._follows[replica.address] = asyncio.create_task(
                    routing.follow_load(replica, self.name), name=f"load {self.name} {replica.address}"
                )

    async def _discover(self) -> None:
        """Ask every replica what it serves now, when one starts serving and every model_refresh_s,
        until the backend closes."""
        # Not only cancellation ends it: Python 3.11's wait_for swallows a cancel that arrives as its
        # inner future completes (a lookup answering as the backend closes), and `close` then hung.
        while not self._closed:
            self._rediscover.clear()
            try:
                await self._resolve()
                await self.refresh_models()
            except Exception:
                # The pools must keep being refreshed: a bug here would freeze them for good.
                log.exception("%s: model discovery failed", self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rediscover.wait(), self.model_refresh_s)

    async def _resolve(self) -> None:
        """The addresses the dns:/// name resolves to now, one replica each (kept while the name
        still lists it; a failed resolution keeps the last ones)."""
        if self._dns is None:
            return
        host, port = self._dns
        try:
            found = await asyncio.wait_for(_lookup(host, int(port)), DISCOVERY_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            log.warning("%s: cannot resolve %s: %s", self.name, host, error)
            return
        ips = _one_family(found)
        if ips:
            self._use_addresses(host, port, ips)

    def _use_addresses(self, host: str, port: str, ips: list[str]) -> None:
        current = {replica.address: replica for replica in self.pool.replicas}
        members = []
        for ip in ips:
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            replica = current.pop(address, None)
            if replica is None:
                target = f"ipv6:{address}" if ":" in ip else f"ipv4:{address}"
                # TLS verifies the name the target was given by, not the address.
                options = [
                    *replica_channel_options(),
                    ("grpc.default_authority", f"{host}:{port}"),
                    ("grpc.ssl_target_name_override", host),
                ]
                channel = self._factory(target, options, list(self._interceptors))
                replica = Replica(address, channel, target=target, options=options)
                replica.on_serving = self._rediscover.set
                log.info("%s: %s resolves to %s", self.name, host, address)
            members.append(replica)
        if [replica.address for replica in members] == [replica.address for replica in self.pool.replicas]:
            return
        for gone in current.values():
            self._retire(gone)
        self.pool.replicas = members
        self.replicas = [replica.address for replica in members]
        self.attempts = self._attempts_option
        self._rebuild_pools()
        self.watch()

    def _retire(self, replica: Replica) -> None:
        """Stop watching a replica the name no longer lists; its channel closes after a grace."""
        for tasks in (self._watch_tasks, self._follows):
            task = tasks.pop(replica.address, None)
            if task is not None:
                task.cancel()
        self.listings.pop(replica.address, None)
        log.info("%s: %s left", self.name, replica.address)
        # Tracked as a reload's old channels are, so that `close` closes it if the grace is cut short.
        self._old_channels.add(replica.channel)
        task = asyncio.get_running_loop().create_task(replica.channel.close(grace=tls.RELOAD_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(functools.partial(_forget, self._old_channels, replica.channel))

    async def _list(self, replica: Replica) -> list[info_pb2.ServedModel] | None:
        stub = replica.stub(info_pb2_grpc.InfoServiceStub)
        try:
            reply = await stub.ListServedModels(
                info_pb2.ListServedModelsRequest(), timeout=DISCOVERY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            log.debug("%s replica %s: cannot list models: %s", self.name, replica.address, error.code().name)
            return None
        return list(reply.models)

    async def refresh_models(self) -> None:
        """Ask every replica what it serves and rebuild the model pools (a replica that does not
        answer, or lists nothing while not SERVING (loading, restarting), keeps its last listing:
        its health decides whether it gets calls)."""
        async with self._listing:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        replicas = list(self.pool.replicas)
        listings = await asyncio.gather(*(self._list(replica) for replica in replicas))
        current = self.pool.replicas
        for replica, listing in zip(replicas, listings, strict=True):
            if listing is None or not any(replica is member for member in current):
                continue  # no answer, or the name stopped resolving to it meanwhile (retired)
            if not listing and replica.health != SERVING and self.listings.get(replica.address):
                # Loading or restarting: its models stay known (503 while it is down, not 404).
                continue
            before = [model.id for model in self.listings.get(replica.address, [])]
            if [model.id for model in listing] != before:
                log.info(
                    "%s replica %s serves %s",
                    self.name,
                    replica.address,
                    ", ".join(model.id for model in listing) or "nothing",
                )
            self.listings[replica.address] = listing
        self._listed_at = self._clock()
        self._rebuild_pools()

    def _rebuild_pools(self) -> None:
        self._union = None
        members: dict[str, list[Replica]] = {}
        self.default_model = ""
        for replica in self.pool.replicas:
            listing = self.listings.get(replica.address, [])
            if listing and not self.default_model and self.default_from_listing:
                self.default_model = listing[0].id
            for model in listing:
                members.setdefault(model.id, []).append(replica)
        for model_id, replicas in members.items():
            pool = self.model_pools.get(model_id)
            if pool is None:
                self.model_pools[model_id] = ReplicaPool(replicas, self._clock, self._policy_factory())
            else:
                pool.replicas = replicas
        for gone in set(self.model_pools) - set(members):
            del self.model_pools[gone]

    async def served_models(self) -> list[info_pb2.ServedModel]:
        """The union of the replicas' models, each with `replicas` (how many list it); asked now when
        no replica has answered yet (at most every DISCOVERY_RETRY_S)."""
        if not self.listings and self._clock() - self._listed_at >= DISCOVERY_RETRY_S:
            async with self._listing:
                # Callers that queued behind a refresh take its outcome rather than run their own.
                if not self.listings and self._clock() - self._listed_at >= DISCOVERY_RETRY_S:
                    await self._refresh_locked()
        # Asked on every request (the catalog resolves names with it): made once per refresh.
        if self._union is None:
            self._union = self._merge()
        return self._union

    def _merge(self) -> list[info_pb2.ServedModel]:
        union: dict[str, info_pb2.ServedModel] = {}
        for replica in self.pool.replicas:
            for model in self.listings.get(replica.address, []):
                known = union.get(model.id)
                if known is None:
                    known = union[model.id] = info_pb2.ServedModel()
                    known.CopyFrom(model)
                    known.replicas = 0
                known.replicas += 1
                known.loaded = known.loaded or model.loaded
        return list(union.values())

    def unlisted(self) -> bool:
        """Whether some replica has not yet said what it serves: no listing, or an empty one while it is
        not SERVING (loading, or not reachable yet)."""
        return any(
            not self.listings.get(replica.address) and replica.health != SERVING
            for replica in self.pool.replicas
        )

    def pool_for(self, model: str) -> ReplicaPool:
        """The pool of `model` ("": the default model, the first listed by the first replica that
        answered, when `default_from_listing`); every replica for a model-less request otherwise, and
        for a model no replica lists (none answered yet, or an embedding model loaded on demand)."""
        return self.model_pools.get(model or self.default_model, self.pool)

    def serving(self, models: Collection[str]) -> list[Replica]:
        """The replicas that list one of `models` (by any of its names); all of them when none does."""
        listed = [
            replica
            for replica in self.pool.replicas
            if any(
                any(name in aliases(model) for name in models)
                for model in self.listings.get(replica.address, [])
            )
        ]
        return listed or list(self.pool.replicas)

    def pick(self, avoid: Collection[Replica] = (), prefix: Sequence[int] = (), model: str = "") -> Replica:
        self.watch()
        self.reload_channels()
        return self.pool_for(model).pick(avoid, prefix)

    def reload_channels(self) -> bool:
        """New channels for every replica when the client TLS files changed (checked at most every
        tls.RELOAD_CHECK_S); the old ones close after tls.RELOAD_GRACE_S, so calls on them finish."""
        now = self._clock()
        if self._files_watch is None or now - self._checked < tls.RELOAD_CHECK_S:
            return False
        try:
            loop = asyncio.get_running_loop()  # the old channels are closed in it
        except RuntimeError:
            return False
        self._checked = now
        if self._files_watch.reload() is None:
            return False
        options = channel_options(self._attempts_option) if self._named else replica_channel_options()
        for replica in self.pool.replicas:
            made = self._factory(replica.target, replica.options or options, list(self._interceptors))
            old = replica.replace_channel(made)
            self._old_channels.add(old)
            task = loop.create_task(old.close(grace=tls.RELOAD_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            task.add_done_callback(functools.partial(_forget, self._old_channels, old))
        self.reloads += 1
        log.info("%s: client certificate changed: new channels to %s", self.name, self.target)
        return True

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel of the next replica in the round-robin (for calls made outside `Backends`)."""
        return self.pick().channel

    def info_stubs(self) -> dict[str, info_pb2_grpc.InfoServiceAsyncStub]:
        return {
            replica.address: replica.stub(info_pb2_grpc.InfoServiceStub) for replica in self.pool.replicas
        }

    async def close(self) -> None:
        self._closed = True
        self._rediscover.set()  # a discovery loop that missed its cancellation ends now
        tasks = [*self._watches, *self._closing, *self._follows.values()]
        if self._discovery is not None:
            tasks.append(self._discovery)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in [*self._old_channels, *self.replica_channels.values()]:
            await channel.close()


class Backends:
    """The calls the gateway's servicers make; the only place that talks to the backends."""

    def __init__(self, generator: Backend, embedder: Backend, cache: ResponseCache) -> None:
        self.generator = generator
        self.embedder = embedder
        self.cache = cache
        # Each embedder replica applies its own default model to a request that names none.
        embedder.default_from_listing = False
        embedder._rebuild_pools()

    def _generation(self, replica: Replica) -> generation_pb2_grpc.GenerationServiceAsyncStub:
        return replica.stub(generation_pb2_grpc.GenerationServiceStub)

    def _embedding(self, replica: Replica) -> embedding_pb2_grpc.EmbeddingServiceAsyncStub:
        return replica.stub(embedding_pb2_grpc.EmbeddingServiceStub)

    async def _unary(
        self,
        backend: Backend,
        method: str,
        callable_of: Callable[[Replica], grpc.aio.UnaryUnaryMultiCallable[Any, ResponseT]],
        request: Message,
        kind: type[ResponseT],
        context: Context,
        cacheable: bool,
    ) -> ResponseT:
        if cacheable:
            cached = self.cache.get(method, request, kind)
            if cached is not None:
                charge_tokens(_usage_tokens(cached))
                return cached

        async def attempt(replica: Replica) -> ResponseT:
            timeout, metadata = call_options(context, backend.tracing)
            reply: ResponseT = await callable_of(replica)(request, timeout=timeout, metadata=metadata)
            return reply

        model = str(getattr(request, "model", ""))
        prefix = routing.prefix_key(request) if backend is self.generator else ()
        response = await _with_retries(backend, backend.attempts, method, attempt, model, prefix)
        charge_tokens(_usage_tokens(response))
        if cacheable:
            self.cache.put(method, request, response)
        return response

    async def generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> generation_pb2.GenerateResponse:
        return await self._unary(
            self.generator,
            "Generate",
            lambda replica: self._generation(replica).Generate,
            request,
            generation_pb2.GenerateResponse,
            context,
            is_deterministic(request),
        )

    async def chat(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> generation_pb2.ChatResponse:
        return await self._unary(
            self.generator,
            "Chat",
            lambda replica: self._generation(replica).Chat,
            request,
            generation_pb2.ChatResponse,
            context,
            is_deterministic(request),
        )

    async def solve_math(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> generation_pb2.SolveMathResponse:
        return await self._unary(
            self.generator,
            "SolveMath",
            lambda replica: self._generation(replica).SolveMath,
            request,
            generation_pb2.SolveMathResponse,
            context,
            is_deterministic(request),
        )

    async def solve_coding(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> generation_pb2.SolveCodingResponse:
        return await self._unary(
            self.generator,
            "SolveCoding",
            lambda replica: self._generation(replica).SolveCoding,
            request,
            generation_pb2.SolveCodingResponse,
            context,
            is_deterministic(request),
        )

    async def _stream(
        self,
        method: str,
        callable_of: Callable[
            [Replica], grpc.aio.UnaryStreamMultiCallable[Any, generation_pb2.GenerateStreamResponse]
        ],
        request: Message,
        context: Context,
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        """The replica's messages. A stream refused with UNAVAILABLE before its first message is
        started again on another replica (RESOURCE_EXHAUSTED: on one not tried yet, while one is left);
        one cut off after it ends with that error (never replayed)."""
        backend = self.generator
        model = str(getattr(request, "model", ""))
        prefix = routing.prefix_key(request)
        tried: list[Replica] = []
        number = 0
        while True:
            replica = await _next_replica(backend, tried, number, model, prefix)
            number += 1
            timeout, metadata = call_options(context, backend.tracing)
            call: grpc.aio.UnaryStreamCall[Any, generation_pb2.GenerateStreamResponse] | None = None
            started = False
            replica.outstanding += 1
            try:
                call = callable_of(replica)(request, timeout=timeout, metadata=metadata)
                async for message in call:
                    if not started:
                        # Recorded once the replica answered: a call refused or failed before its
                        # first message computed no prefix there.
                        backend.pool_for(model).served(replica, prefix)
                    started = True
                    if message.HasField("usage"):
                        charge_tokens(message.usage.total_tokens)
                    yield message
                return
            except grpc.aio.AioRpcError as error:
                BACKEND_ERRORS.labels(method, error.code().name).inc()
                if started and _retryable(error) and not _has_status_details(error):
                    raise stream_cut(backend.name, error) from error
                if not started and _busy_elsewhere(backend, error, tried, replica, model):
                    continue
                if started or not _retryable(error) or number >= backend.stream_attempts:
                    raise
                backend.pool.mark_failed(replica)
                tried.append(replica)
            finally:
                # The client went away (CancelledError/GeneratorExit) or the stream ended: either way the
                # backend's batch slot must be freed now, not when its deadline passes.
                if call is not None:
                    call.cancel()
                replica.outstanding -= 1

    def generate_stream(
        self, request: generation_pb2.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream(
            "GenerateStream", lambda replica: self._generation(replica).GenerateStream, request, context
        )

    def chat_stream(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream(
            "ChatStream", lambda replica: self._generation(replica).ChatStream, request, context
        )

    def solve_math_stream(
        self, request: generation_pb2.SolveMathRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream(
            "SolveMathStream", lambda replica: self._generation(replica).SolveMathStream, request, context
        )

    def solve_coding_stream(
        self, request: generation_pb2.SolveCodingRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        return self._stream(
            "SolveCodingStream", lambda replica: self._generation(replica).SolveCodingStream, request, context
        )

    async def embed(
        self, request: embedding_pb2.EmbedRequest, context: Context
    ) -> embedding_pb2.EmbedResponse:
        return await self._unary(
            self.embedder,
            "Embed",
            lambda replica: self._embedding(replica).Embed,
            request,
            embedding_pb2.EmbedResponse,
            context,
            True,
        )

    async def _fan_out(
        self,
        method: str,
        replicas: Sequence[Replica],
        callable_of: Callable[[Replica], grpc.aio.UnaryUnaryMultiCallable[Any, ResponseT]],
        request: Message,
        context: Context,
    ) -> list[tuple[Replica, ResponseT | grpc.aio.AioRpcError]]:
        """`request` sent to every one of `replicas` at once; each answer or error, in their order.
        Each call waits at most the client's deadline, FAN_OUT_TIMEOUT_S when the client set none."""
        timeout, metadata = call_options(context, self.embedder.tracing)
        if timeout is None:
            timeout = FAN_OUT_TIMEOUT_S

        async def one(replica: Replica) -> tuple[Replica, ResponseT | grpc.aio.AioRpcError]:
            try:
                return replica, await callable_of(replica)(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                BACKEND_ERRORS.labels(method, error.code().name).inc()
                return replica, error

        self.embedder.watch()
        return list(await asyncio.gather(*(one(replica) for replica in replicas)))

    async def preload(
        self, request: embedding_pb2.PreloadModelsRequest, context: Context
    ) -> embedding_pb2.PreloadModelsResponse:
        """Every embedder replica that lists one of the models (all of them when none does) loads
        them; `accepted` joins the answers, `addresses` names every replica asked (those that failed
        are logged; when all failed the client gets the last error)."""
        replicas = self.embedder.serving(request.models)
        answers = await self._fan_out(
            "PreloadModels",
            replicas,
            lambda replica: self._embedding(replica).PreloadModels,
            request,
            context,
        )
        reply = embedding_pb2.PreloadModelsResponse(addresses=[replica.address for replica in replicas])
        for _, answer in _answered("PreloadModels", answers):
            reply.accepted.extend(name for name in answer.accepted if name not in reply.accepted)
        return reply

    async def cache_status(
        self, request: embedding_pb2.GetCacheStatusRequest, context: Context
    ) -> embedding_pb2.GetCacheStatusResponse:
        """Every embedder replica's status in `replicas`; the top-level fields sum (budgets, memory,
        evictions) or join (models, loading) the answers."""
        answers = await self._fan_out(
            "GetCacheStatus",
            self.embedder.pool.replicas,
            lambda replica: self._embedding(replica).GetCacheStatus,
            request,
            context,
        )
        reply = embedding_pb2.GetCacheStatusResponse()
        strategies: list[str] = []
        for replica, answer in answers:
            if isinstance(answer, grpc.aio.AioRpcError):
                reply.replicas.add(address=replica.address, error=_error_text(answer))
                continue
            reply.replicas.add(address=replica.address, status=answer)
            if answer.strategy and answer.strategy not in strategies:
                strategies.append(answer.strategy)
            reply.max_models += answer.max_models
            reply.memory_budget_mib += answer.memory_budget_mib
            reply.memory_used_mib += answer.memory_used_mib
            reply.evictions += answer.evictions
            reply.models.extend(answer.models)
            reply.loading.extend(name for name in answer.loading if name not in reply.loading)
        _raise_when_none_answered(answers)
        reply.strategy = ",".join(strategies)
        return reply

    async def clear_cache(
        self, request: embedding_pb2.ClearCacheRequest, context: Context
    ) -> embedding_pb2.ClearCacheResponse:
        """Every embedder replica that lists one of the models (all of them for all models, or when
        none does) unloads them; `cleared` joins the answers, `addresses` names every replica asked
        (those that failed are logged; when all failed the client gets the last error)."""
        replicas = self.embedder.serving(request.models) if request.models else self.embedder.pool.replicas
        answers = await self._fan_out(
            "ClearCache", replicas, lambda replica: self._embedding(replica).ClearCache, request, context
        )
        reply = embedding_pb2.ClearCacheResponse(addresses=[replica.address for replica in replicas])
        for _, answer in _answered("ClearCache", answers):
            reply.cleared.extend(name for name in answer.cleared if name not in reply.cleared)
        return reply

    async def model_counter(
        self, request: embedding_pb2.GetModelCounterRequest, context: Context
    ) -> embedding_pb2.GetModelCounterResponse:
        """The counters of every embedder replica that lists the model (all of them when none does),
        each in `replicas`, summed in the top-level fields."""
        replicas = self.embedder.serving([request.model]) if request.model else self.embedder.pool.replicas
        answers = await self._fan_out(
            "GetModelCounter",
            replicas,
            lambda replica: self._embedding(replica).GetModelCounter,
            request,
            context,
        )
        reply = embedding_pb2.GetModelCounterResponse(model=request.model)
        for replica, answer in answers:
            if isinstance(answer, grpc.aio.AioRpcError):
                reply.replicas.add(address=replica.address, error=_error_text(answer))
                continue
            reply.replicas.add(address=replica.address, counter=answer)
            reply.model = reply.model or answer.model
            reply.requests += answer.requests
            reply.inputs += answer.inputs
            reply.tokens += answer.tokens
            reply.errors += answer.errors
        _raise_when_none_answered(answers)
        return reply

    async def close(self) -> None:
        await asyncio.gather(self.generator.close(), self.embedder.close())


def _error_text(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


def _answered(
    method: str, answers: Sequence[tuple[Replica, ResponseT | grpc.aio.AioRpcError]]
) -> list[tuple[Replica, ResponseT]]:
    """The replicas that answered with their answers (each that failed is logged); the last error
    when none did."""
    _raise_when_none_answered(answers)
    for replica, answer in answers:
        if isinstance(answer, grpc.aio.AioRpcError):
            log.warning("embedder replica %s: %s failed: %s", replica.address, method, _error_text(answer))
    return [(replica, answer) for replica, answer in answers if not isinstance(answer, grpc.aio.AioRpcError)]


def _raise_when_none_answered(answers: Sequence[tuple[Replica, Message | grpc.aio.AioRpcError]]) -> None:
    errors = [answer for _, answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
    if errors and len(errors) == len(answers):
        raise errors[-1]


def _retryable(error: grpc.aio.AioRpcError) -> bool:
    """A replica lost or stopping: UNAVAILABLE, or CANCELLED, which a replica's server sends for the
    calls it drops when it stops (the gateway's own caller cancelling raises CancelledError)."""
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _has_status_details(error: grpc.aio.AioRpcError) -> bool:
    """Whether the backend itself ended the call with a google.rpc status (not a lost connection)."""
    return any(key == STATUS_DETAILS_KEY for key, _ in error.trailing_metadata() or ())


def stream_cut(backend: str, error: grpc.aio.AioRpcError) -> GatewayError:
    """UNAVAILABLE for a stream whose replica went away after sending messages, which are not
    replayed: the client should send the request again (after the RetryInfo delay)."""
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"the {backend} replica serving this stream went away ({error.details()}); "
        "the tokens already sent are not replayed: send the request again",
        (retry_info(RETRY_AFTER_CUT_S), error_info("REPLICA_LOST", ERROR_DOMAIN)),
    )


async def _next_replica(
    backend: Backend, tried: list[Replica], number: int, model: str = "", prefix: Sequence[int] = ()
) -> Replica:
    """The replica of `model` for attempt `number`: one not tried yet when any is available; a replica
    that already failed this call (the only one left) gets a short, growing pause first."""
    replica = backend.pick(avoid=tried, prefix=prefix, model=model)
    if replica in tried:
        await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (number - 1), 1.0))
    return replica


def _busy_elsewhere(
    backend: Backend, error: grpc.aio.AioRpcError, tried: list[Replica], replica: Replica, model: str
) -> bool:
    """Whether a RESOURCE_EXHAUSTED call goes on to another replica of `model` not tried yet (it
    records `replica` as tried); when all were tried the client gets the last refusal."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    tried.append(replica)
    return backend.pool_for(model).untried(tried)


async def _with_retries(
    backend: Backend,
    attempts: int,
    method: str,
    attempt: Callable[[Replica], Awaitable[T]],
    model: str = "",
    prefix: Sequence[int] = (),
) -> T:
    """`attempt` on the picked replica of `model`; after UNAVAILABLE again on another one, `attempts`
    in all; after RESOURCE_EXHAUSTED on another one not tried yet, while one is left."""
    tried: list[Replica] = []
    number = 0
    while True:
        replica = await _next_replica(backend, tried, number, model, prefix)
        replica.outstanding += 1
        try:
            answer = await attempt(replica)
            backend.pool_for(model).served(replica, prefix)
            return answer
        except grpc.aio.AioRpcError as error:
            BACKEND_ERRORS.labels(method, error.code().name).inc()
            number += 1
            if _busy_elsewhere(backend, error, tried, replica, model):
                continue
            if not _retryable(error) or number >= attempts:
                raise
            backend.pool.mark_failed(replica)
            tried.append(replica)
        finally:
            replica.outstanding -= 1


def _lookup(host: str, port: int) -> asyncio.Future[list[Any]]:
    """getaddrinfo in a daemon thread: a resolver that hangs must hold up neither the event loop
    nor the process's exit (the loop's default executor is waited for when the loop closes)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[Any]] = loop.create_future()

    def settle(result: list[Any] | None, error: OSError | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or [])

    def run() -> None:
        try:
            found: list[Any] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            outcome: tuple[list[Any] | None, OSError | None] = (None, error)
        else:
            outcome = (found, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"resolve {host}", daemon=True).start()
    return future


def _one_family(found: Sequence[Any]) -> list[str]:
    """The IPv4 addresses among getaddrinfo's answers (the IPv6 ones when there are none), sorted:
    a host that has both is one process, not two replicas, and an answer in another order is the
    same set of replicas."""
    ips = {str(item[4][0]) for item in found}
    v4 = [ip for ip in ips if ":" not in ip]
    chosen = v4 or [ip for ip in ips if ":" in ip]
    return sorted(chosen, key=ipaddress.ip_address)


def _forget(channels: set[grpc.aio.Channel], channel: grpc.aio.Channel, _: object) -> None:
    channels.discard(channel)
