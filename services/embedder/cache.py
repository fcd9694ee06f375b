"""The model cache: load on first use, evict least recently used by count or by memory. Loads run one at a
time in a worker thread; a model evicted while a batch still holds it stays alive until that batch ends."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from services.embedder.exceptions import EmbedderError, ModelNotFound, ModelTooLarge, ModelUnavailable
from services.embedder.models import EmbeddingModel
from services.embedder.spec import ModelSpec

log = logging.getLogger(__name__)

MIB = 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class CacheSettings:
    strategy: str
    max_models: int
    memory_budget_mib: float
    safety_margin_mib: float
    default_name: str
    default_source: str
    allowed: tuple[str, ...]
    device: str
    dtype: str
    backend: str = "torch"
    onnx_dir: str = ""
    precision: str = "fp32"
    verify_precision: bool = False


@dataclass
class CacheEntry:
    model: EmbeddingModel
    hits: int
    loaded_at: float
    last_used_at: float


@dataclass(frozen=True)
class CachedModelStatus:
    name: str
    size_mib: float
    device: str
    dimensions: int
    max_seq_length: int
    hits: int
    loaded_at: float
    last_used_at: float


@dataclass(frozen=True)
class CacheStatus:
    strategy: str
    max_models: int
    memory_budget_mib: float
    memory_used_mib: float
    models: list[CachedModelStatus]
    loading: list[str]
    evictions: int


@dataclass(frozen=True)
class CacheEvents:
    """Hooks for metrics; each receives the model name."""

    on_hit: Callable[[str], None] = lambda name: None
    on_miss: Callable[[str], None] = lambda name: None
    on_evict: Callable[[str], None] = lambda name: None
    on_change: Callable[[int, float], None] = lambda count, mib: None


def _weights_bytes(folder: Path) -> int:
    return sum(
        path.stat().st_size
        for path in folder.rglob("*")
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)
    )


class ModelCache:
    def __init__(
        self,
        settings: CacheSettings,
        loader: Callable[[ModelSpec], EmbeddingModel] = EmbeddingModel.load,
        events: CacheEvents | None = None,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._events = events or CacheEvents()
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._loading: dict[str, asyncio.Future[EmbeddingModel]] = {}
        self._load_lock = asyncio.Lock()
        self._resolved: dict[str, ModelSpec] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.evictions = 0
        self.hits = 0
        default_short = settings.default_name.rsplit("/", 1)[-1]
        self._default_aliases = {"", settings.default_name, default_short}

    # -- names -------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelSpec:
        """Map a requested name to a model source; ModelNotFound when it is not allowed or absent."""
        name = name.strip()
        cached = self._resolved.get(name)
        if cached is not None:
            return cached
        spec = self._resolve(name)
        self._resolved[name] = spec
        return spec

    def _resolve(self, name: str) -> ModelSpec:
        s = self.settings
        if name in self._default_aliases:
            return self._spec(s.default_name, s.default_source)
        folder = Path(name).expanduser()
        try:
            is_folder = folder.is_dir()
        except OSError as error:  # e.g. a name too long for a path: no folder, and no model id either
            raise ModelNotFound(name, f"not a folder and not a valid model id ({error.strerror})") from None
        if is_folder:
            real = folder.resolve()
            self._check_allowed(name, real)
            if not ((real / "modules.json").is_file() or (real / "config.json").is_file()):
                raise ModelNotFound(name, f"folder {real} holds no modules.json or config.json")
            return self._spec(str(real), str(real))
        if name.startswith(("/", "./", "../", "~")):
            raise ModelNotFound(name, "no such folder")
        self._check_allowed(name, None)
        return self._spec(name, self._hub_snapshot(name))

    def _spec(self, name: str, source: str) -> ModelSpec:
        s = self.settings
        return ModelSpec(
            name,
            source,
            s.device,
            s.dtype,
            backend=s.backend,
            onnx_dir=s.onnx_dir,
            precision=s.precision,
            verify_precision=s.verify_precision,
        )

    def _check_allowed(self, name: str, folder: Path | None) -> None:
        allowed = self.settings.allowed
        if not allowed or name in allowed:
            return
        if folder is not None:
            for entry in allowed:
                root = Path(entry).expanduser()
                if root.is_dir() and folder.is_relative_to(root.resolve()):
                    return
        raise ModelNotFound(name, "not in the embedder's allowed models")

    @staticmethod
    def _hub_snapshot(name: str) -> str:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
        try:
            return str(snapshot_download(name, local_files_only=offline))
        except HFValidationError as error:
            raise ModelNotFound(name, f"not a folder and not a valid model id ({error})") from None
        except Exception as error:
            where = (
                "in the local Hugging Face cache (downloads are off)" if offline else "locally or on the Hub"
            )
            raise ModelNotFound(name, f"not a folder and not found {where}: {type(error).__name__}") from None

    # -- use ---------------------------------------------------------------------------------

    def loaded(self, name: str) -> EmbeddingModel | None:
        entry = self._entries.get(name)
        return entry.model if entry else None

    async def get(self, name: str) -> EmbeddingModel:
        """The model for `name`, loading it (and evicting others) when it is not loaded."""
        spec = self.resolve(name)
        entry = self._entries.get(spec.name)
        if entry is not None:
            self._entries.move_to_end(spec.name)
            entry.hits += 1
            entry.last_used_at = time.time()
            self.hits += 1
            self._events.on_hit(spec.name)
            return entry.model
        self._events.on_miss(spec.name)
        model = await asyncio.shield(self._start_load(spec))
        entry = self._entries.get(spec.name)
        if entry is not None:
            entry.last_used_at = time.time()
        return model

    def _start_load(self, spec: ModelSpec) -> asyncio.Future[EmbeddingModel]:
        future = self._loading.get(spec.name)
        if future is None:
            future = asyncio.ensure_future(self._load(spec))
            self._loading[spec.name] = future
            future.add_done_callback(lambda _: self._loading.pop(spec.name, None))
            # A failed background load is reported to whoever awaits it; silence the rest.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _load(self, spec: ModelSpec) -> EmbeddingModel:
        async with self._load_lock:
            existing = self._entries.get(spec.name)
            if existing is not None:
                return existing.model
            estimate = self._estimate_bytes(spec)
            self._make_room(spec.name, estimate)
            started = time.monotonic()
            try:
                model = await asyncio.to_thread(self._loader, spec)
            except EmbedderError:
                raise
            except Exception as error:
                log.warning("loading %s from %s failed: %s", spec.name, spec.source, error)
                raise ModelUnavailable(spec.name, f"{type(error).__name__}: {error}") from None
            now = time.time()
            self._entries[spec.name] = CacheEntry(model, hits=0, loaded_at=now, last_used_at=now)
            if self.settings.strategy == "memory_aware":
                # The estimate came from the files; evict further if the real size is larger.
                self._evict_over_budget(keep=spec.name)
            log.info(
                "loaded %s (%.0f MiB on %s) in %.1fs",
                spec.name,
                model.size_bytes / MIB,
                spec.device,
                time.monotonic() - started,
            )
            self._changed()
            return model

    def preload(self, names: Iterable[str]) -> list[str]:
        """Resolve every name (raising for an unknown one), then load the missing in the background."""
        specs = [self.resolve(name) for name in names]
        accepted: list[str] = []
        for spec in specs:
            if spec.name not in self._entries:
                future = self._start_load(spec)
                task = asyncio.ensure_future(self._await_quietly(future))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            if spec.name not in accepted:
                accepted.append(spec.name)
        return accepted

    @staticmethod
    async def _await_quietly(future: asyncio.Future[EmbeddingModel]) -> None:
        try:
            await future
        except EmbedderError as error:
            log.warning("preload failed: %s", error)

    def clear(self, names: Iterable[str]) -> list[str]:
        wanted = list(names)
        if not wanted:
            keys = list(self._entries)
        else:
            keys = []
            for name in wanted:
                key = self.resolve(name).name
                if key in self._entries and key not in keys:
                    keys.append(key)
        for key in keys:
            del self._entries[key]
        if keys:
            self._release_memory()
            self._changed()
        return keys

    # -- memory ------------------------------------------------------------------------------

    def budget_bytes(self) -> float:
        s = self.settings
        if s.memory_budget_mib > 0:
            return s.memory_budget_mib * MIB
        return max(self._device_total_bytes() - s.safety_margin_mib * MIB, 0.0)

    def used_bytes(self) -> int:
        return sum(entry.model.size_bytes for entry in self._entries.values())

    def _device_total_bytes(self) -> float:
        if self.settings.device.startswith("cuda"):
            return float(torch.cuda.mem_get_info()[1])
        return float(psutil.virtual_memory().total)

    def _device_free_bytes(self) -> float:
        if self.settings.device.startswith("cuda"):
            return float(torch.cuda.mem_get_info()[0])
        return float(psutil.virtual_memory().available)

    def _estimate_bytes(self, spec: ModelSpec) -> int:
        folder = Path(spec.source)
        size = _weights_bytes(folder) if folder.is_dir() else 0
        if spec.dtype in ("bfloat16", "float16"):
            size //= 2
        return size

    def _make_room(self, name: str, estimate: int) -> None:
        s = self.settings
        if s.strategy == "fixed_size":
            while len(self._entries) >= s.max_models:
                self._evict_lru()
            return
        budget = self.budget_bytes()
        if estimate > budget:
            raise ModelTooLarge(
                name,
                f"it needs about {estimate / MIB:.0f} MiB and the memory budget is {budget / MIB:.0f} MiB",
            )
        while self._entries and self.used_bytes() + estimate > budget:
            self._evict_lru()
        margin = s.safety_margin_mib * MIB
        while self._entries and self._device_free_bytes() - estimate < margin:
            self._evict_lru()
        free = self._device_free_bytes()
        if free - estimate < margin:
            raise ModelTooLarge(
                name,
                f"it needs about {estimate / MIB:.0f} MiB; {free / MIB:.0f} MiB are free on "
                f"{s.device} and {s.safety_margin_mib:.0f} MiB must stay free",
            )

    def _evict_over_budget(self, keep: str) -> None:
        budget = self.budget_bytes()
        while self.used_bytes() > budget and any(key != keep for key in self._entries):
            self._evict_lru(skip=keep)

    def _evict_lru(self, skip: str | None = None) -> None:
        for key in self._entries:
            if key != skip:
                del self._entries[key]
                self.evictions += 1
                self._events.on_evict(key)
                log.info("evicted %s (%s)", key, self.settings.strategy)
                self._release_memory()
                self._changed()
                return

    def _release_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _changed(self) -> None:
        self._events.on_change(len(self._entries), self.used_bytes() / MIB)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> CacheStatus:
        s = self.settings
        models = [
            CachedModelStatus(
                name=key,
                size_mib=entry.model.size_bytes / MIB,
                device=entry.model.device,
                dimensions=entry.model.dimensions,
                max_seq_length=entry.model.max_seq_length,
                hits=entry.hits,
                loaded_at=entry.loaded_at,
                last_used_at=entry.last_used_at,
            )
            for key, entry in self._entries.items()
        ]
        return CacheStatus(
            strategy=s.strategy,
            max_models=s.max_models,
            memory_budget_mib=self.budget_bytes() / MIB if s.strategy == "memory_aware" else 0.0,
            memory_used_mib=self.used_bytes() / MIB,
            models=models,
            loading=sorted(self._loading),
            evictions=self.evictions,
        )

    def entries(self) -> list[EmbeddingModel]:
        return [entry.model for entry in self._entries.values()]
