"""The embedder's model cache with a fake loader over small model folders: LRU eviction by count
and by memory budget, preload, clear, one load per model at a time, and the counters."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from services.embedder.cache import MIB, CacheEvents, CacheSettings, ModelCache
from services.embedder.exceptions import ModelNotFound, ModelTooLarge, ModelUnavailable
from services.embedder.models import EmbeddingModel
from services.embedder.spec import ModelSpec
from tests.unit.fakes import AWAIT_TIMEOUT, FakeEmbeddingModel, eventually, within


def model_folder(root: Path, name: str, weights_mib: float) -> str:
    """A folder the cache accepts as a model, with a (sparse) weights file of the given size."""
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"name": name}))
    with (folder / "model.safetensors").open("wb") as weights:
        weights.truncate(int(weights_mib * MIB))
    return str(folder.resolve())


class Loader:
    """Loads a fake model as large as its weights file (or `real_mib` for a name); counts loads;
    with `hold()` each load waits for `release()`; `fail` makes the next load raise."""

    def __init__(self, real_mib: dict[str, float] | None = None) -> None:
        self.real_mib = real_mib or {}
        self.loads: list[str] = []
        self.gate: threading.Event | None = None
        self.fail = False

    def hold(self) -> None:
        self.gate = threading.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    def __call__(self, spec: ModelSpec) -> EmbeddingModel:
        if self.gate is not None and not self.gate.wait(AWAIT_TIMEOUT):
            raise TimeoutError("the test never released this load")
        self.loads.append(spec.name)
        if self.fail:
            self.fail = False
            raise OSError("disk on fire")
        folder = Path(spec.source)
        size = self.real_mib.get(folder.name, (folder / "model.safetensors").stat().st_size / MIB)
        return FakeEmbeddingModel(spec.name, int(size * MIB))


def settings(
    default: str, strategy: str = "fixed_size", max_models: int = 2, budget_mib: float = 0.0
) -> CacheSettings:
    return CacheSettings(
        strategy=strategy,
        max_models=max_models,
        memory_budget_mib=budget_mib,
        safety_margin_mib=0.0,
        default_name="default-model",
        default_source=default,
        allowed=(),
        device="cpu",
        dtype="float32",
    )


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, str]:
    return {name: model_folder(tmp_path, name, 1.25) for name in ("default", "a", "b", "c")}


def names(cache: ModelCache) -> list[str]:
    return [model.name for model in cache.status().models]


async def test_fixed_size_evicts_the_least_recently_used_model(folders: dict[str, str]) -> None:
    evicted: list[str] = []
    loader = Loader()
    cache = ModelCache(settings(folders["default"]), loader, CacheEvents(on_evict=evicted.append))
    a, b, c = folders["a"], folders["b"], folders["c"]
    await within(cache.get(a))
    await within(cache.get(b))
    await within(cache.get(a))  # a is now the most recently used
    await within(cache.get(c))
    assert names(cache) == [a, c] and evicted == [b]
    assert cache.evictions == 1 and cache.status().evictions == 1
    assert loader.loads == [a, b, c]


async def test_memory_aware_evicts_by_the_budget_in_lru_order(folders: dict[str, str]) -> None:
    cache = ModelCache(settings(folders["default"], "memory_aware", max_models=0, budget_mib=3.0), Loader())
    a, b, c = folders["a"], folders["b"], folders["c"]
    for name in (a, b, a, c):
        await within(cache.get(name))
    # 1.25 MiB each in a 3 MiB budget: two fit, the third pushes out the least recently used.
    assert names(cache) == [a, c]
    status = cache.status()
    assert status.memory_budget_mib == 3.0 and status.memory_used_mib == 2.5


async def test_a_model_larger_than_its_files_evicts_more_once_loaded(tmp_path: Path) -> None:
    small = model_folder(tmp_path, "small", 1.0)
    grows = model_folder(tmp_path, "grows", 1.0)
    cache = ModelCache(settings(small, "memory_aware", budget_mib=3.0), Loader(real_mib={"grows": 2.5}))
    await within(cache.get(small))
    await within(cache.get(grows))
    assert names(cache) == [grows]


async def test_a_model_over_the_whole_budget_is_refused_and_evicts_nothing(tmp_path: Path) -> None:
    small = model_folder(tmp_path, "small", 1.0)
    huge = model_folder(tmp_path, "huge", 4.0)
    cache = ModelCache(settings(small, "memory_aware", budget_mib=3.0), Loader())
    await within(cache.get(""))
    with pytest.raises(ModelTooLarge, match="memory budget is 3 MiB"):
        await within(cache.get(huge))
    assert names(cache) == ["default-model"] and cache.evictions == 0


async def test_preload_loads_in_the_background_and_status_shows_it_loading(folders: dict[str, str]) -> None:
    loader = Loader()
    loader.hold()
    cache = ModelCache(settings(folders["default"]), loader)
    a = folders["a"]
    assert cache.preload([a, a, "default-model"]) == [a, "default-model"]
    assert cache.status().loading == sorted([a, "default-model"])
    loader.release()
    await eventually(lambda: not cache.status().loading)
    assert sorted(names(cache)) == sorted([a, "default-model"])
    with pytest.raises(ModelNotFound):
        cache.preload(["/no/such/folder"])


async def test_clear_unloads_the_named_models_or_all(folders: dict[str, str]) -> None:
    cache = ModelCache(settings(folders["default"], max_models=3), Loader())
    a, b = folders["a"], folders["b"]
    for name in ("", a, b):
        await within(cache.get(name))
    assert cache.clear([a, a]) == [a]
    assert cache.clear([a]) == []
    assert cache.clear([]) == ["default-model", b]
    assert names(cache) == [] and cache.loaded(b) is None


async def test_hits_misses_and_changes_are_counted(folders: dict[str, str]) -> None:
    seen: dict[str, list[object]] = {"hit": [], "miss": [], "change": []}
    events = CacheEvents(
        on_hit=seen["hit"].append,
        on_miss=seen["miss"].append,
        on_change=lambda count, mib: seen["change"].append((count, mib)),
    )
    cache = ModelCache(settings(folders["default"]), Loader(), events)
    a = folders["a"]
    for name in ("", a, a, "default-model", a):
        await within(cache.get(name))
    assert seen["miss"] == ["default-model", a]
    assert seen["hit"] == [a, "default-model", a]
    assert seen["change"] == [(1, 1.25), (2, 2.5)]
    assert cache.hits == 3
    assert {m.name: m.hits for m in cache.status().models} == {"default-model": 1, a: 2}


async def test_concurrent_requests_for_one_model_load_it_once(folders: dict[str, str]) -> None:
    loader = Loader()
    loader.hold()
    cache = ModelCache(settings(folders["default"]), loader)
    a = folders["a"]
    waiting = [asyncio.ensure_future(cache.get(a)) for _ in range(3)]
    await eventually(lambda: cache.status().loading == [a])
    loader.release()
    models = await within(asyncio.gather(*waiting))
    assert loader.loads == [a] and all(model is models[0] for model in models)


async def test_a_failed_load_is_reported_and_the_next_request_tries_again(folders: dict[str, str]) -> None:
    loader = Loader()
    loader.fail = True
    cache = ModelCache(settings(folders["default"]), loader)
    with pytest.raises(ModelUnavailable, match="disk on fire"):
        await within(cache.get(""))
    assert names(cache) == []
    await within(cache.get(""))
    assert loader.loads == ["default-model", "default-model"] and names(cache) == ["default-model"]


async def test_names_outside_the_allowed_list_are_not_found(folders: dict[str, str], tmp_path: Path) -> None:
    allowed = settings(folders["default"])
    cache = ModelCache(replace(allowed, allowed=(str(tmp_path / "a"),)), Loader())
    assert (await within(cache.get(folders["a"]))).name == folders["a"]
    with pytest.raises(ModelNotFound, match="allowed"):
        await within(cache.get(folders["b"]))
    with pytest.raises(ModelNotFound, match="no such folder"):
        await within(cache.get("./missing"))


async def test_a_name_too_long_for_a_path_is_not_found(folders: dict[str, str]) -> None:
    """Regression (fuzzing): Path.is_dir raised ENAMETOOLONG for a long model name, an INTERNAL
    error instead of NOT_FOUND."""
    cache = ModelCache(settings(folders["default"]), Loader())
    with pytest.raises(ModelNotFound, match="not a valid model id"):
        await cache.get("é" * 300)
