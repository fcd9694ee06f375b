"""The whole tree stays ruff- and mypy-clean (the settings are in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from tests.stack import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_ruff_finds_no_problem() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_code_unchanged() -> None:
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_services_tools_and_tests() -> None:
    paths = [p for p in ("services", "tools", "tests", "bench") if (ROOT / p).exists()]
    result = run("mypy", *paths)
    assert result.returncode == 0, result.stdout + result.stderr
