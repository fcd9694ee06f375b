"""The fast tier's fixtures; the fakes themselves are in tests/unit/fakes.py."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from services.generator.engine import Engine, SchedulerLimits
from tests.unit.fakes import EngineFactory, FakeRunner, FakeTokenizer, within


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    """Builds engines over a FakeRunner (started unless start=False); closes them afterwards."""
    engines: list[Engine] = []

    def build(
        runner: FakeRunner | None = None,
        limits: SchedulerLimits | None = None,
        tokenizer: FakeTokenizer | None = None,
        start: bool = True,
    ) -> Engine:
        engine = Engine(
            runner or FakeRunner(), tokenizer or FakeTokenizer(), "fake-model", limits or SchedulerLimits()
        )
        if start:
            engine.start()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        runner = engine.runner
        if isinstance(runner, FakeRunner):
            runner.free()
        await within(engine.close())


@pytest.fixture(autouse=True)
def no_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fast tier starts no process: a test that tries fails and names the command."""

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any) -> None:
        raise AssertionError(f"tests/unit must not start a process: {args!r}")

    # Popen's own set-up runs first, so the refused object still cleans up quietly.
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    yield
