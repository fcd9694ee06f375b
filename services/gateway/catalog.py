"""The models the backends serve, asked from them and kept for a few seconds, so that requests
for an unknown model are refused before any backend work."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc.aio
from inference.v1 import info_pb2, info_pb2_grpc

from services.common.model_names import aliases
from services.gateway.backends import Backend
from services.gateway.errors import not_found

log = logging.getLogger(__name__)

TTL_SECONDS = 10.0


class ModelCatalog:
    def __init__(self, generator: Backend, embedder: Backend) -> None:
        self._backends = {"generation": generator, "embedding": embedder}
        self._models: dict[str, list[info_pb2.ServedModel]] = {"generation": [], "embedding": []}
        self._fetched: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def models(self, task: str) -> list[info_pb2.ServedModel]:
        if time.monotonic() - self._fetched.get(task, -1e9) > TTL_SECONDS or not self._models[task]:
            async with self._lock:
                if time.monotonic() - self._fetched.get(task, -1e9) > TTL_SECONDS or not self._models[task]:
                    await self._fetch(task)
        return self._models[task]

    async def _fetch(self, task: str) -> None:
        stub = info_pb2_grpc.InfoServiceStub(self._backends[task].channel)
        try:
            reply = await stub.ListServedModels(info_pb2.ListServedModelsRequest(), timeout=3.0)
        except grpc.aio.AioRpcError as error:
            log.warning("cannot list the %s models: %s", task, error.code().name)
            return
        self._models[task] = [model for model in reply.models if model.task in ("", task)]
        self._fetched[task] = time.monotonic()

    async def all_models(self) -> list[info_pb2.ServedModel]:
        generation, embedding = await asyncio.gather(self.models("generation"), self.models("embedding"))
        return generation + embedding

    async def resolve(self, task: str, name: str, field: str = "model") -> str:
        """The backend's id for a model name ("" stays "": the backend's default). NOT_FOUND for a
        name no backend serves; when the backends cannot be asked the name goes through as is."""
        if not name:
            return name
        models = await self.models(task)
        if not models:
            return name
        for model in models:
            if name in aliases(model):
                return model.id
        if task == "embedding":
            # The embedder loads other sentence-transformers models on demand.
            return name
        raise not_found(f"{task} model", name, [model.id for model in models])

    async def default(self, task: str) -> str:
        models = await self.models(task)
        return models[0].id if models else ""

    async def find(self, name: str) -> info_pb2.ServedModel | None:
        for model in await self.all_models():
            if name in aliases(model):
                return model
        return None
