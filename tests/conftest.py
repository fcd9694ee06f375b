"""Shared test setup. Session-wide fixtures that start real services live in the fixtures_*
modules below, one per tier, so that every test file shares one running stack.

Two tiers: tests/unit/ is the fast one (fakes, no model, no process: `make test-fast`); every
other test file is end-to-end and is marked `slow` here, so `-m "not slow"` also selects the
fast tier."""

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures_generator",
    "tests.fixtures_embedder",
    "tests.fixtures_gateway",
    "tests.fixtures_make_run",
    "tests.fixtures_postgres",
    "tests.fixtures_predictions",
    "tests.fixtures_redis",
]

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.slow)
