"""The client's types hold: mypy --strict accepts the package and a well-typed use of it, and
rejects client code with a wrong keyword, field name or argument type."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import ROOT

CLIENT_PACKAGE = ROOT / "clients" / "python" / "src" / "inference_client"
CASES = ROOT / "tests" / "typing_cases"
ERROR_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*)$")


def mypy_strict(*paths: Path) -> subprocess.CompletedProcess[str]:
    # From the repository root so that pyproject's [tool.mypy] (mypy_path) applies.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_client_package_passes_mypy_strict() -> None:
    result = mypy_strict(CLIENT_PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_well_typed_client_usage_passes_mypy_strict() -> None:
    result = mypy_strict(CASES / "well_typed_usage.py")
    assert result.returncode == 0, result.stdout + result.stderr


def expected_errors(source: str) -> dict[int, str]:
    expected = {}
    for number, line in enumerate(source.splitlines(), start=1):
        _, marker, message = line.partition("# E: ")
        if marker:
            expected[number] = message.strip()
    return expected


@pytest.mark.parametrize("case", sorted(p.name for p in (CASES / "rejected").glob("*.py.txt")))
def test_mypy_rejects_wrong_names_in_client_code(case: str, tmp_path: Path) -> None:
    source_path = CASES / "rejected" / case
    checked = tmp_path / case.removesuffix(".txt")
    shutil.copyfile(source_path, checked)
    expected = expected_errors(source_path.read_text())
    assert expected, f"{case} marks no expected error"

    result = mypy_strict(checked)

    assert result.returncode == 1, result.stdout + result.stderr
    reported: dict[int, list[str]] = {}
    for line in result.stdout.splitlines():
        match = ERROR_LINE.match(line)
        if match:
            reported.setdefault(int(match["line"]), []).append(match["message"])
    for number, message in expected.items():
        assert any(message in found for found in reported.get(number, [])), (
            f"line {number}: expected {message!r}, mypy said {reported.get(number)}\n{result.stdout}"
        )
    unexpected = {number: found for number, found in reported.items() if number not in expected}
    assert not unexpected, f"errors on lines not marked '# E:': {unexpected}"
