"""The figures each reliability case measured: `report("overload", completed=130, ...)` records
them; the suite prints them all at its end and writes them to test-results/reliability.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "reliability.json"

FIGURES: list[tuple[str, dict[str, Any]]] = []


def report(case: str, **figures: Any) -> None:
    """Record one case's figures (numbers, or short strings) under its name."""
    FIGURES.append((case, dict(figures)))


def summary_lines() -> list[str]:
    lines = []
    for case, figures in FIGURES:
        shown = ", ".join(f"{name}={_shown(value)}" for name, value in figures.items())
        lines.append(f"{case}: {shown}")
    return lines


def write_results() -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps([{"case": case, **figures} for case, figures in FIGURES], indent=2))


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
