"""The `prefer` request header (RFC 7240) of a create: `wait=N` holds the reply until the
prediction ends or N seconds pass, as Replicate's `Prefer: wait` does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.predictions.errors import invalid_argument


def prefer_wait(metadata: Iterable[tuple[str, Any]], max_seconds: int) -> int | None:
    """Seconds of `prefer: wait=N` (`wait` alone: the most), None without it; raises
    INVALID_ARGUMENT on "prefer" for a wait outside 1..max_seconds."""
    for name, value in metadata:
        if name != "prefer" or not isinstance(value, str):
            continue
        for token in value.split(","):
            key, _, raw = token.strip().partition("=")
            if key.strip().lower() != "wait":
                continue
            if not raw.strip():
                return max_seconds
            try:
                seconds = int(raw.strip())
            except ValueError:
                seconds = 0
            if not 1 <= seconds <= max_seconds:
                raise invalid_argument(
                    [
                        (
                            "prefer",
                            f"wait must be an integer from 1 to {max_seconds} seconds, got {raw.strip()!r}",
                        )
                    ]
                )
            return seconds
    return None
