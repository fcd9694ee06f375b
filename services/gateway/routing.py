"""Which replica of a pool takes a request: round robin, the least loaded (the gateway's own count of
calls in flight weighed with each replica's WatchLoad report), or prefix affinity (the replica that
holds the request's prompt prefix in its prefix cache, while its load stays within a bound of the
least loaded). Plain Python apart from `follow_load`, which keeps a replica's report current."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message
from inference.v1 import info_pb2, info_pb2_grpc

from services.gateway.config import ROUTING_POLICIES, GatewayConfig

log = logging.getLogger(__name__)

# prefix_key cuts the text the model sees first into blocks of this many characters (and at the end
# of each chat message), hashing each cumulative prefix; at most MAX_PREFIX_KEYS keys.
BLOCK_CHARS = 64
MAX_PREFIX_KEYS = 128
# Replicas remembered per prefix key, most recent last: a shared system prompt sits in the cache of
# every replica that served it, and any of them hits.
HOLDERS_PER_KEY = 8
# A replica with less than this share of the pool's most free KV tokens counts as full.
LOW_KV_SHARE = 0.125
# How often a backend is asked to report its load.
LOAD_INTERVAL_MS = 100
# Pause before watching a replica's load again after the watch ended, doubling up to the maximum.
LOAD_RETRY_S = 0.25
LOAD_RETRY_MAX_S = 2.0
# A backend without WatchLoad (an older version) is asked again this rarely.
LOAD_UNIMPLEMENTED_RETRY_S = 60.0


@dataclass(frozen=True)
class LoadReport:
    """A replica's last WatchLoad report."""

    running: int
    waiting: int
    capacity: int
    free_kv_tokens: int


class Routable(Protocol):
    """What a policy reads of a replica."""

    address: str
    # Calls this gateway has in flight on the replica (the pool maintains it).
    outstanding: int
    # The replica's last load report, set by follow_load; None while there is none.
    load_report: LoadReport | None


class Followed(Routable, Protocol):
    """A replica whose load follow_load watches: its current channel (which may be replaced)."""

    channel: grpc.aio.Channel


R = TypeVar("R", bound=Routable)


class RoutingPolicy(Protocol):
    def choose(self, candidates: Sequence[R], prefix: Sequence[int]) -> R:
        """One of `candidates` (never empty) for a request whose prompt has the prefix keys `prefix`."""
        ...

    def served(self, replica: Routable, prefix: Sequence[int]) -> None:
        """`replica` was picked for a request with the prefix keys `prefix`."""
        ...


def make_policy(config: GatewayConfig) -> RoutingPolicy:
    """A new policy of the configured kind; each pool has its own (it keeps state)."""
    if config.routing_policy == "round_robin":
        return RoundRobin()
    if config.routing_policy == "least_loaded":
        return LeastLoaded()
    if config.routing_policy == "prefix_affinity":
        return PrefixAffinity(
            config.routing_load_bound, config.routing_load_slack, config.routing_affinity_entries
        )
    raise ValueError(
        f"--routing-policy must be one of {', '.join(ROUTING_POLICIES)}, got {config.routing_policy!r}"
    )


def load_of(replica: Routable, most_free_kv: int = 0) -> float:
    """A replica's load in requests: the larger of the gateway's calls in flight on it and the
    sequences its report says run or wait (other gateways' calls among them); those beyond its
    capacity wait rather than compute and count twice, and a replica with less than LOW_KV_SHARE of
    `most_free_kv` (the pool's most) free KV tokens counts a full batch more."""
    report = replica.load_report
    if report is None:
        return float(replica.outstanding)
    busy = report.running + report.waiting
    load = float(max(replica.outstanding, busy))
    if report.capacity > 0:
        load += max(0, busy - report.capacity)
    if most_free_kv > 0 and report.free_kv_tokens < most_free_kv * LOW_KV_SHARE:
        load += max(report.capacity, 1)
    return load


def _most_free_kv(candidates: Sequence[Routable]) -> int:
    return max((r.load_report.free_kv_tokens for r in candidates if r.load_report is not None), default=0)


class RoundRobin:
    """Each candidate in turn, whatever its load: today's behaviour."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[R], prefix: Sequence[int]) -> R:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice

    def served(self, replica: Routable, prefix: Sequence[int]) -> None:
        pass


class LeastLoaded:
    """The candidate with the least `load_of`; ties rotate."""

    def __init__(self) -> None:
        self._next = 0

    def loads(self, candidates: Sequence[R]) -> list[float]:
        most_free = _most_free_kv(candidates)
        return [load_of(replica, most_free) for replica in candidates]

    def least(self, candidates: Sequence[R], loads: Sequence[float]) -> R:
        lowest = min(loads)
        tied = [replica for replica, load in zip(candidates, loads, strict=True) if load == lowest]
        choice = tied[self._next % len(tied)]
        self._next += 1
        return choice

    def choose(self, candidates: Sequence[R], prefix: Sequence[int]) -> R:
        return self.least(candidates, self.loads(candidates))

    def served(self, replica: Routable, prefix: Sequence[int]) -> None:
        pass


class PrefixAffinity(LeastLoaded):
    """The least loaded of the candidates that last served the request's longest known prefix, when
    its load is at most `bound` x the least loaded candidate's + `slack`; else the least loaded.
    Remembers at most `entries` prefix keys, least recently used out first."""

    def __init__(self, bound: float, slack: float, entries: int) -> None:
        super().__init__()
        self.bound = bound
        self.slack = slack
        self.entries = entries
        # prefix key -> addresses that served it, most recent last
        self._holders: OrderedDict[int, list[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def choose(self, candidates: Sequence[R], prefix: Sequence[int]) -> R:
        loads = self.loads(candidates)
        lowest = min(loads)
        by_address = {replica.address: index for index, replica in enumerate(candidates)}
        for key in reversed(prefix):
            holders = self._holders.get(key)
            indices = [by_address[a] for a in holders or () if a in by_address]
            if not indices:
                continue
            best = min(indices, key=lambda index: loads[index])
            if loads[best] <= self.bound * lowest + self.slack:
                return candidates[best]
            break  # the replica with the prefix is too busy: the least loaded computes it again
        return self.least(candidates, loads)

    def served(self, replica: Routable, prefix: Sequence[int]) -> None:
        for key in prefix:
            holders = self._holders.get(key)
            if holders is None:
                self._holders[key] = [replica.address]
            else:
                if replica.address in holders:
                    holders.remove(replica.address)
                holders.append(replica.address)
                del holders[:-HOLDERS_PER_KEY]
                self._holders.move_to_end(key)
        while len(self._holders) > self.entries:
            self._holders.popitem(last=False)


def _segments(request: Message) -> tuple[str, list[str]]:
    """The model id and the pieces of text the model sees first, in order (a chat's tools, then
    each message's role and content); no pieces for a request without a generation prompt."""
    fields = {descriptor.name for descriptor in request.DESCRIPTOR.fields}
    model = str(getattr(request, "model", "")) if "model" in fields else ""
    pieces: list[str] = []
    if "tools" in fields:
        tools = [json_format.MessageToDict(tool) for tool in getattr(request, "tools")]  # noqa: B009
        if tools:
            pieces.append("tools\x1f" + json.dumps(tools, sort_keys=True, separators=(",", ":")))
    if "messages" in fields and len(getattr(request, "messages")):  # noqa: B009
        # Role and content with separators that chat text does not hold, so that "ab"+"c" and
        # "a"+"bc" differ; each message ends a piece, where the next turn's prompt continues.
        pieces.extend(f"{m.role}\x1f{m.content}\x1e" for m in getattr(request, "messages"))  # noqa: B009
    elif "prompt" in fields and getattr(request, "prompt"):  # noqa: B009
        pieces.append("prompt\x1f" + getattr(request, "prompt"))  # noqa: B009
    elif "problem" in fields and getattr(request, "problem"):  # noqa: B009
        # The solve tasks put the problem into a prompt of their own; the kind and the language
        # stand for that prompt's fixed text.
        language = str(getattr(request, "language", "")) if "language" in fields else ""
        kind = request.DESCRIPTOR.name.removesuffix("Request")
        pieces.append(f"{kind}\x1f{language}\x1f" + getattr(request, "problem"))  # noqa: B009
    return model, pieces


def _cut_positions(pieces: Sequence[str]) -> list[int]:
    """Where the joined text of `pieces` is cut: every BLOCK_CHARS characters and at each piece's
    end, the first MAX_PREFIX_KEYS of them."""
    ends: list[int] = []
    total = 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    limit = BLOCK_CHARS * MAX_PREFIX_KEYS
    blocks = range(BLOCK_CHARS, min(total, limit) + 1, BLOCK_CHARS)
    return sorted({*blocks, *(end for end in ends if end <= limit)})[:MAX_PREFIX_KEYS]


def prefix_key(request: Message) -> tuple[int, ...]:
    """Hashes of the request's prompt text (with its model id) cut every BLOCK_CHARS characters
    and at the end of each chat message, each hash over everything before its cut, at most
    MAX_PREFIX_KEYS of them; two requests share the keys of the text they share. () for a request
    without a generation prompt."""
    model, pieces = _segments(request)
    if not pieces:
        return ()
    text = "".join(pieces)
    digest = hashlib.blake2b(model.encode() + b"\x00", digest_size=8)
    keys: list[int] = []
    start = 0
    for cut in _cut_positions(pieces):
        digest.update(text[start:cut].encode("utf-8", "surrogatepass"))
        start = cut
        keys.append(int.from_bytes(digest.digest(), "big") >> 1)  # a non-negative int64
    return tuple(keys)


async def follow_load(
    replica: Followed, backend_name: str, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> None:
    """Keep `replica.load_report` current from the replica's WatchLoad until cancelled: None while
    there is no report (watch failed, replica drained); after a failure it starts again after a
    pause that grows from LOAD_RETRY_S to LOAD_RETRY_MAX_S, after UNIMPLEMENTED (an older backend)
    after LOAD_UNIMPLEMENTED_RETRY_S; a replaced channel is watched at once."""
    pause = LOAD_RETRY_S
    while True:
        channel = replica.channel
        stub = info_pb2_grpc.InfoServiceStub(channel)
        try:
            call = stub.WatchLoad(
                info_pb2.WatchLoadRequest(min_interval_ms=LOAD_INTERVAL_MS), wait_for_ready=True
            )
            async for reply in call:
                replica.load_report = LoadReport(
                    running=reply.running,
                    waiting=reply.waiting,
                    capacity=reply.capacity,
                    free_kv_tokens=reply.free_kv_tokens,
                )
                pause = LOAD_RETRY_S
                if replica.channel is not channel:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as error:
            replica.load_report = None
            if replica.channel is not channel:
                continue  # the old channel was closed after a reload: not the replica's fault
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info(
                    "%s replica %s reports no load: routing by calls in flight", backend_name, replica.address
                )
                pause = LOAD_UNIMPLEMENTED_RETRY_S
            else:
                log.debug("%s replica %s: load watch ended: %s", backend_name, replica.address, error.code())
        except Exception:
            # A watch that died silently would leave the last report standing for good.
            log.exception("%s replica %s: load watch failed", backend_name, replica.address)
            replica.load_report = None
        else:
            replica.load_report = None  # the replica drained (or the channel was replaced)
        if replica.channel is not channel:
            continue
        await sleep(pause)
        pause = min(pause * 2, LOAD_RETRY_MAX_S) if pause < LOAD_UNIMPLEMENTED_RETRY_S else LOAD_RETRY_S
