"""The reliability suite: loopback only, bounded in time, each case reporting its figures
(tests/reliability/figures.py), printed at the end of the run. The soak runs only under
`make soak` (INFERENCE_SOAK=1)."""

from __future__ import annotations

import os

import pytest
from _pytest.terminal import TerminalReporter

from tests.reliability import figures


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("INFERENCE_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="the soak runs under `make soak` (INFERENCE_SOAK=1)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if not figures.FIGURES:
        return
    terminalreporter.section("reliability figures")
    for line in figures.summary_lines():
        terminalreporter.write_line(line)
    figures.write_results()
