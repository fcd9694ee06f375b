"""The served models a prediction may name: the gateway's (InfoService.ListServedModels, asked
with the caller's credentials), by every name the gateway accepts, kept for a few seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc.aio
from inference.v1 import info_pb2, info_pb2_grpc

from services.common.model_names import aliases

MODELS_TTL_SECONDS = 10.0


@dataclass(frozen=True)
class ServedModel:
    id: str
    embedding: bool


class ModelDirectory(Protocol):
    async def served(self, metadata: Sequence[tuple[str, str]]) -> dict[str, ServedModel]:
        """Every name a served model answers to (its id and aliases) -> the model."""
        ...


class GatewayModels:
    """The gateway's served models, asked with the first caller's credentials after each
    MODELS_TTL_SECONDS and shared until the next ask."""

    def __init__(self, channel: grpc.aio.Channel | Callable[[], grpc.aio.Channel]) -> None:
        # A callable gives the channel to use now (rebuilt when the client certificate is renewed).
        self._channel = channel if callable(channel) else lambda: channel
        self._names: dict[str, ServedModel] = {}
        self._fetched = -1e9
        self._lock = asyncio.Lock()

    async def served(self, metadata: Sequence[tuple[str, str]]) -> dict[str, ServedModel]:
        if time.monotonic() - self._fetched > MODELS_TTL_SECONDS:
            async with self._lock:
                if time.monotonic() - self._fetched > MODELS_TTL_SECONDS:
                    stub = info_pb2_grpc.InfoServiceStub(self._channel())
                    reply = await stub.ListServedModels(
                        info_pb2.ListServedModelsRequest(), metadata=tuple(metadata), timeout=5.0
                    )
                    names: dict[str, ServedModel] = {}
                    for model in reply.models:
                        served = ServedModel(model.id, model.task == "embedding")
                        for name in aliases(model):
                            names.setdefault(name, served)
                    self._names = names
                    self._fetched = time.monotonic()
        return self._names
