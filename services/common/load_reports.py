"""WatchLoad for a backend tier: a report at once, then one whenever a figure changes, at most every
`min_interval_ms` (the backend's default when 0, never under a floor), until the client cancels or the
server drains."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from inference.v1 import info_pb2

DEFAULT_INTERVAL_MS = 100
# The shortest interval a client may ask for: reports are sampled this often at most.
MIN_INTERVAL_MS = 20


def interval_seconds(request: info_pb2.WatchLoadRequest) -> float:
    """The time between two samples that `request` asks for, within the floor."""
    asked = request.min_interval_ms or DEFAULT_INTERVAL_MS
    return max(asked, MIN_INTERVAL_MS) / 1000.0


async def load_reports(
    request: info_pb2.WatchLoadRequest,
    sample: Callable[[], info_pb2.WatchLoadResponse],
    draining: Callable[[], bool],
) -> AsyncIterator[info_pb2.WatchLoadResponse]:
    """`sample()` now, then again every interval, yielding it when it differs from the last one sent;
    returns (status OK) once `draining()` is true."""
    interval = interval_seconds(request)
    last: info_pb2.WatchLoadResponse | None = None
    while not draining():
        report = sample()
        if report != last:
            last = report
            yield report
        # Sampling beats waking on every change: a busy engine changes its figures every step,
        # and this bounds the work per watcher to one comparison per interval.
        await asyncio.sleep(interval)
