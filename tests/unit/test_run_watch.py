"""`make run` keeps watching after the stack is SERVING: a tier that drains (NOT_SERVING), stops
(UNREACHABLE) or serves again is reported by name. The probes are scripted; no process starts."""

from __future__ import annotations

import io
import threading
from pathlib import Path

from tools.run import Plan, StackPrinter, Tier, state_change, watch


class Script:
    """Answers each tier's probes from a list of states; the last one repeats. Once every list is
    spent it stops the watcher, as `make run` does at its end."""

    def __init__(self, printer: StackPrinter, states: dict[str, list[str]]) -> None:
        self.printer = printer
        self.states = {name: list(sequence) for name, sequence in states.items()}

    def __call__(self, tier: Tier) -> str:
        sequence = self.states[tier.name]
        state = sequence.pop(0) if len(sequence) > 1 else sequence[0]
        if all(len(left) == 1 for left in self.states.values()):
            self.printer.stopping.set()
        return state


def test_a_tier_that_drains_stops_and_comes_back_is_reported(tmp_path: Path) -> None:
    tiers = [Tier("generator", "true", 1, "grpc"), Tier("embedder", "true", 2, "grpc")]
    plan = Plan(tiers, {"GATEWAY_PORT": "1"}, [])
    output = io.StringIO()
    printer = StackPrinter(output, tmp_path, ["generator", "embedder"])
    printer.started.set()
    script = Script(
        printer,
        {
            "generator": [
                "SERVING",
                "SERVING",
                "NOT_SERVING",
                "UNREACHABLE",
                "NOT_SERVING",
                "SERVING",
                "SERVING",
            ],
            "embedder": ["SERVING", "SERVING", "SERVING", "SERVING", "SERVING", "SERVING", "SERVING"],
        },
    )
    watcher = threading.Thread(target=watch, args=(plan, printer, 0.001, 10.0, script))
    watcher.start()
    watcher.join(timeout=10)
    printer.close()
    assert not watcher.is_alive()
    text = output.getvalue()
    said = [line for line in text.splitlines() if "generator is" in line or "embedder is" in line]
    assert [line.split("| ", 1)[-1] for line in said] == [
        "generator is SERVING after 0.0s",
        "embedder is SERVING after 0.0s",
        "generator is NOT_SERVING: draining (no new requests) or not ready",
        "generator is UNREACHABLE: stopped or restarting",
        "generator is NOT_SERVING: draining (no new requests) or not ready",
        "generator is SERVING again",
    ], text


def test_no_change_says_nothing() -> None:
    assert state_change("gateway", "SERVING", "SERVING") is None
    assert (
        state_change("gateway", "SERVING", "UNREACHABLE") == "gateway is UNREACHABLE: stopped or restarting"
    )
