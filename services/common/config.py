"""One typed configuration object per service: a frozen dataclass (help in `field(metadata={"help": ...})`)
whose field `max_batch_size` is the flag `--max-batch-size` and the variable `<PREFIX>_MAX_BATCH_SIZE`; a
flag beats the environment, which beats the default."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


LogLevel = typing.Literal["debug", "info", "warning", "error"]


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _field_parser(annotation: Any) -> tuple[Any, Any]:
    """The argparse type for one field's annotation, and its choices (for Literal types)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _field_parser(inner[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if all(isinstance(c, str) and c == c.lower() for c in choices):
            # Lower-case choices match in any case, so LOG_LEVEL=INFO and --log-level info agree.
            return str.lower, choices
        return type(choices[0]), choices
    if origin in (list, tuple):
        return _parse_list, None
    if annotation is bool:
        return parse_bool, None
    if annotation in (int, float, str):
        return annotation, None
    raise TypeError(f"unsupported config field type {annotation!r}")


def env_name(prefix: str, field_name: str) -> str:
    return f"{prefix}_{field_name.upper()}"


def build_parser(config_type: type[Any], prefix: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Every flag can also be set by the environment variable {prefix}_<FLAG> "
        "(upper case, underscores); a flag given on the command line wins.",
    )
    hints = typing.get_type_hints(config_type)
    for item in dataclasses.fields(config_type):
        parse, choices = _field_parser(hints[item.name])
        default = item.default if item.default is not dataclasses.MISSING else None
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        variable = env_name(prefix, item.name)
        if variable in os.environ:
            default = parse(os.environ[variable])
            if isinstance(default, list) and typing.get_origin(hints[item.name]) is tuple:
                default = tuple(default)
        help_text = item.metadata.get("help", "")
        parser.add_argument(
            "--" + item.name.replace("_", "-"),
            dest=item.name,
            type=parse,
            choices=choices,
            default=default,
            metavar=item.metadata.get("metavar"),
            help=f"{help_text} [env {variable}]",
        )
    return parser


def load_config(
    config_type: type[ConfigT], prefix: str, description: str, argv: Sequence[str] | None = None
) -> ConfigT:
    """Parse flags (and the environment) into `config_type`; exits with usage on bad values."""
    parser = build_parser(config_type, prefix, description)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    hints = typing.get_type_hints(config_type)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            values[name] = tuple(value)
    config = config_type(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as error:
            parser.error(str(error))
    return config
