"""The configuration tables of docs/configuration.md, generated from the services' config dataclasses.

python -m tools.config_tables            print the tables
python -m tools.config_tables --write    replace them in docs/configuration.md (between the markers)
python -m tools.config_tables --check    fail when docs/configuration.md is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "configuration.md"
TIERS = ("gateway", "generator", "embedder", "predictions")
START = "<!-- config-tables:start (python -m tools.config_tables --write) -->"
END = "<!-- config-tables:end -->"


def config_class(tier: str) -> type[Any]:
    """The frozen dataclass in services/<tier>/config.py that has the fixed `port` field."""
    module = importlib.import_module(f"services.{tier}.config")
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and dataclasses.is_dataclass(value)
            and value.__module__ == module.__name__
            and "port" in {f.name for f in dataclasses.fields(value)}
        ):
            return value
    raise LookupError(f"services/{tier}/config.py has no config dataclass with a `port` field")


def _default(item: dataclasses.Field[Any]) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "(required)"
    if isinstance(value, tuple | list):
        value = ",".join(str(v) for v in value)
    if isinstance(value, bool):
        value = str(value).lower()
    text = str(value)
    return f"`{text}`" if text else '`""`'


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(str(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) in (tuple, list):
        return "list"
    return getattr(annotation, "__name__", str(annotation))


def table(tier: str) -> str:
    cls = config_class(tier)
    prefix = tier.upper()
    hints = typing.get_type_hints(cls)
    rows = [
        f"### {tier} (`python -m services.{tier}`)",
        "",
        "| flag | environment | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for item in dataclasses.fields(cls):
        flag = "--" + item.name.replace("_", "-")
        help_text = str(item.metadata.get("help", "")).replace("|", "\\|")
        env = f"{prefix}_{item.name.upper()}"
        rows.append(f"| `{flag}` | `{env}` | {_type(hints[item.name])} | {_default(item)} | {help_text} |")
    return "\n".join(rows)


def tables() -> str:
    return "\n\n".join(table(tier) for tier in TIERS)


def replace(document: str, body: str) -> str:
    """`document` with `body` between the markers; LookupError when a marker is missing."""
    head, start, rest = document.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise LookupError(f"{TARGET.relative_to(ROOT)} lacks the markers {START!r} and {END!r}")
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update docs/configuration.md")
    group.add_argument("--check", action="store_true", help="fail when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    body = tables()
    if not (args.write or args.check):
        print(body)
        return 0
    current = TARGET.read_text()
    fresh = replace(current, body)
    if args.check:
        if fresh != current:
            print("docs/configuration.md's tables are stale: run `python -m tools.config_tables --write`")
            return 1
        return 0
    TARGET.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
