"""STAND-IN written by task A (pools) so its branch runs: the agreed interface of the routing
policies with round-robin only. Task B owns this file and replaces it whole (least_loaded,
prefix_affinity, the load formula, prefix keys)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from inference.v1 import info_pb2, info_pb2_grpc

if TYPE_CHECKING:
    from services.gateway.config import GatewayConfig

# Pause before asking a replica for load reports again after its stream ended.
FOLLOW_RETRY_S = 2.0


@dataclass(frozen=True)
class LoadReport:
    running: int
    waiting: int
    capacity: int
    free_kv_tokens: int


class Routable(Protocol):
    address: str
    outstanding: int
    load_report: LoadReport | None


R = TypeVar("R", bound=Routable)


class RoutingPolicy(Protocol):
    def choose(self, candidates: Sequence[R], prefix: Sequence[int]) -> R: ...

    def served(self, replica: Routable, prefix: Sequence[int]) -> None: ...


class RoundRobin:
    """Each candidate in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[R], prefix: Sequence[int]) -> R:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen

    def served(self, replica: Routable, prefix: Sequence[int]) -> None:
        pass


def make_policy(config: GatewayConfig) -> RoutingPolicy:
    """One policy per pool (it keeps its own state)."""
    return RoundRobin()


def prefix_key(request: Message) -> tuple[int, ...]:
    """The request's prefix key; () in this stand-in."""
    return ()


class _WithChannel(Routable, Protocol):
    channel: grpc.aio.Channel


async def follow_load(replica: _WithChannel, backend_name: str) -> None:
    """Keep `replica.load_report` at the replica's last WatchLoad report until cancelled."""
    while True:
        try:
            stub = info_pb2_grpc.InfoServiceStub(replica.channel)
            async for reply in stub.WatchLoad(info_pb2.WatchLoadRequest(), wait_for_ready=True):
                replica.load_report = LoadReport(
                    reply.running, reply.waiting, reply.capacity, reply.free_kv_tokens
                )
        except grpc.aio.AioRpcError:
            pass
        replica.load_report = None
        await asyncio.sleep(FOLLOW_RETRY_S)
