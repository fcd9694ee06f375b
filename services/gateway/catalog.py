"""The models the backends serve, as their replicas last listed them (backends.py asks every replica
when it starts serving and every few seconds), so that requests for an unknown model are refused
before any backend work."""

from __future__ import annotations

import asyncio
import logging

from inference.v1 import info_pb2

from services.common.model_names import aliases
from services.gateway.backends import Backend
from services.gateway.errors import not_found, unavailable

log = logging.getLogger(__name__)


class ModelCatalog:
    def __init__(self, generator: Backend, embedder: Backend) -> None:
        self._backends = {"generation": generator, "embedding": embedder}

    async def models(self, task: str) -> list[info_pb2.ServedModel]:
        """The union of the `task` models the backend's replicas serve, each with its replica count."""
        served = await self._backends[task].served_models()
        return [model for model in served if model.task in ("", task)]

    async def all_models(self) -> list[info_pb2.ServedModel]:
        generation, embedding = await asyncio.gather(self.models("generation"), self.models("embedding"))
        return generation + embedding

    async def resolve(self, task: str, name: str, field: str = "model") -> str:
        """The backend's id for a model name ("" stays "": the default model). NOT_FOUND naming the
        models served for a name no replica serves; UNAVAILABLE (retry) while some replica has not
        said what it serves yet; when no replica has answered yet the name goes through as is."""
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
        if self._backends[task].unlisted():
            # The replica that has not listed yet (starting, or unreachable) may serve it.
            raise unavailable(
                f"{task} model {name!r} is not served by the replicas that answered, and some have "
                "not said what they serve yet (starting or unreachable); retry shortly",
                "BACKEND_UNAVAILABLE",
            )
        raise not_found(f"{task} model", name, [model.id for model in models])

    async def default(self, task: str) -> str:
        backend = self._backends[task]
        await backend.served_models()
        return backend.default_model

    async def find(self, name: str) -> info_pb2.ServedModel | None:
        for model in await self.all_models():
            if name in aliases(model):
                return model
        return None
