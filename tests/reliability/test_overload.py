"""Overload through the edge: 300 concurrent streamed chats and 300 unary ones against a
generator with a small batch and waiting queue. No 5xx, every 200 complete, every 429 and 503
with Retry-After and a JSON error body."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from tests.reliability.figures import report
from tests.reliability.stack import Outcome, Stack, client_for, start_stack, stream_chat, unary_chat

STREAMS = 300
UNARY = 300
# Small enough that the waiting queue fills: most of the 600 calls must be refused, cleanly.
GENERATOR_LIMITS = ("--max-running-sequences", "4", "--max-waiting-requests", "16")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("overload"), generator_args=GENERATOR_LIMITS)
    yield started
    started.stop()


def check(kind: str, outcomes: list[Outcome]) -> None:
    bad = [o for o in outcomes if (o.status >= 500 and o.status != 503) or o.status == 0]
    assert not bad, f"{kind}: {len(bad)} failed, e.g. {[(o.status, o.detail) for o in bad[:3]]}"
    incomplete = [o for o in outcomes if o.status == 200 and not o.complete]
    assert not incomplete, f"{kind}: {len(incomplete)} incomplete 200s, e.g. {incomplete[0].detail}"
    refused = [o for o in outcomes if o.status in (429, 503)]
    unclean = [o for o in refused if not o.refusal_ok]
    assert not unclean, (
        f"{kind}: refusals without Retry-After or JSON: {[(o.status, o.detail) for o in unclean[:3]]}"
    )
    other = Counter(o.status for o in outcomes if o.status not in (200, 429, 503))
    assert not other, f"{kind}: unexpected statuses {dict(other)}"


def test_600_concurrent_chats_are_answered_whole_or_refused_cleanly(stack: Stack) -> None:
    async def burst() -> tuple[list[Outcome], list[Outcome]]:
        async with client_for(stack) as client:
            # Interleaved, so that streams and unary chats compete for the same places.
            calls: list[tuple[bool, Coroutine[Any, Any, Outcome]]] = []
            for i in range(max(STREAMS, UNARY)):
                if i < STREAMS:
                    calls.append((True, stream_chat(client, stack, text=f"Say hello to number {i}.")))
                if i < UNARY:
                    calls.append((False, unary_chat(client, stack, text=f"Say goodbye to number {i}.")))
            results = await asyncio.gather(*(call for _, call in calls))
        streams = [o for (is_stream, _), o in zip(calls, results, strict=True) if is_stream]
        unary = [o for (is_stream, _), o in zip(calls, results, strict=True) if not is_stream]
        return streams, unary

    started = time.monotonic()
    streams, unary = asyncio.run(burst())
    seconds = time.monotonic() - started
    statuses = Counter(o.status for o in streams + unary)
    report(
        "overload",
        streams_ok=sum(o.status == 200 and o.complete for o in streams),
        streams_429=sum(o.status == 429 for o in streams),
        streams_503=sum(o.status == 503 for o in streams),
        unary_ok=sum(o.status == 200 and o.complete for o in unary),
        unary_429=sum(o.status == 429 for o in unary),
        unary_503=sum(o.status == 503 for o in unary),
        status_5xx=sum(s for code, s in statuses.items() if code >= 500 and code != 503),
        seconds=seconds,
    )
    check("streams", streams)
    check("unary", unary)
    assert statuses[200] > 0, f"nothing admitted: {dict(statuses)}"
    assert statuses[429] + statuses[503] > 0, f"the queue never filled: {dict(statuses)}"


def test_the_stack_serves_normally_after_the_burst(stack: Stack) -> None:
    async def one() -> Outcome:
        async with client_for(stack, connections=4) as client:
            return await stream_chat(client, stack, text="Say hello again.")

    outcome = asyncio.run(one())
    assert outcome.status == 200 and outcome.complete, outcome.detail
