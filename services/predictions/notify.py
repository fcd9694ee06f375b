"""In-process change notifications per prediction: whoever writes a prediction calls `changed`,
and whoever waits for it (`Prefer: wait`, the output stream) wakes at once instead of polling."""

from __future__ import annotations

import asyncio


class Changes:
    """Per-prediction wake-ups on one event loop; a waiter is forgotten once it wakes or times
    out, so nothing accumulates for predictions nobody watches."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def changed(self, prediction_id: str) -> None:
        """Wakes everyone waiting on `prediction_id` now."""
        for waiter in self._waiters.pop(prediction_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    # The shared API takes a plain timeout: callers pass what the client asked (Prefer: wait=N).
    async def wait(self, prediction_id: str, timeout: float) -> bool:  # noqa: ASYNC109
        """True when `prediction_id` changed within `timeout` seconds, False when it did not.
        Callers read the prediction, then wait, then read again (a change between the read
        and the wait is seen on the next read, after at most `timeout`)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(prediction_id, set())
        waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, timeout))
            return True
        except TimeoutError:
            return False
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(prediction_id) is waiters:
                del self._waiters[prediction_id]

    def waiting(self, prediction_id: str | None = None) -> int:
        """How many waiters there are (on one prediction, or on all)."""
        if prediction_id is not None:
            return len(self._waiters.get(prediction_id, ()))
        return sum(len(waiters) for waiters in self._waiters.values())
