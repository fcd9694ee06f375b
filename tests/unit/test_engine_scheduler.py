"""Continuous batching in the generator's engine, over a fake runner: requests join the running
batch between steps, finished and cancelled rows leave it at the next step, and a failed step
fails only the requests it held."""

from __future__ import annotations

import pytest

from services.generator.engine import OverCapacity, SamplingParams, SchedulerLimits, TokenEvent
from tests.unit.fakes import EOS, EngineFactory, FakeRunner, drain, eventually, next_letter, within


def text(events: list[TokenEvent]) -> str:
    return "".join(event.text for event in events)


async def test_a_request_submitted_while_others_decode_joins_between_steps_and_leaves_when_done(
    make_engine: EngineFactory,
) -> None:
    runner = FakeRunner()
    runner.hold()
    engine = make_engine(runner)
    first = engine.submit([1, 2], SamplingParams(max_new_tokens=10))
    runner.allow(2)
    await eventually(lambda: len(runner.decoded) == 2)
    second = engine.submit([5, 6], SamplingParams(max_new_tokens=3))
    runner.free()
    first_events, second_events = await drain(first), await drain(second)

    # The first request was not prefilled again: the second joined the running batch.
    assert runner.prefill_rows == [1, 1]
    joined = runner.decoded.index([1, 5])
    assert joined >= 2 and all(rows == [1] for rows in runner.decoded[:joined])
    # Its first token came from the prefill, the next two from two shared steps; then it left.
    assert runner.decoded[joined : joined + 2] == [[1, 5], [1, 5]]
    assert all(rows == [1] for rows in runner.decoded[joined + 2 :])
    assert runner.selected == [[0]]
    assert text(first_events) == "cdefghijkl" and text(second_events) == "ghi"


async def test_a_finished_row_is_evicted_and_the_others_keep_decoding(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    engine = make_engine(runner, start=False)
    short = engine.submit([1, 2], SamplingParams(max_new_tokens=2))
    long = engine.submit([5, 6], SamplingParams(max_new_tokens=5))
    engine.start()
    short_events, long_events = await drain(short), await drain(long)

    assert runner.prefill_rows == [2]
    assert runner.decode_rows == [2, 1, 1, 1]
    assert runner.selected == [[1]]
    assert [e.finish_reason for e in short_events] == [None, "length"]
    assert text(long_events) == "ghijk" and long_events[-1].finish_reason == "length"


async def test_a_row_that_ends_on_its_first_token_never_enters_the_batch(make_engine: EngineFactory) -> None:
    runner = FakeRunner(successor=lambda token: EOS if token == 26 else next_letter(token))
    engine = make_engine(runner, start=False)
    ends = engine.submit([25, 26], SamplingParams(max_new_tokens=5))
    goes_on = engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    engine.start()
    ended, went_on = await drain(ends), await drain(goes_on)

    assert [(e.token_id, e.finish_reason, e.text) for e in ended] == [(EOS, "eos", "")]
    assert runner.prefill_rows == [2]
    assert runner.selected == [[1]] and runner.decode_rows == [1, 1]
    assert text(went_on) == "cde"


async def test_a_cancelled_request_leaves_the_batch_at_the_next_step_and_frees_its_tokens(
    make_engine: EngineFactory,
) -> None:
    runner = FakeRunner()
    runner.hold()
    engine = make_engine(runner, SchedulerLimits(max_total_tokens=(2 + 50) * 2))
    cancelled = engine.submit([1, 2], SamplingParams(max_new_tokens=50))
    kept = engine.submit([5, 6], SamplingParams(max_new_tokens=50))
    with pytest.raises(OverCapacity):
        engine.submit([7, 8], SamplingParams(max_new_tokens=50))
    runner.allow(3)
    await eventually(lambda: len(runner.decoded) == 3)
    cancelled.cancel()
    runner.allow(3)
    events = await drain(cancelled)

    # The step running when the cancel came may still hold the row; the one after does not.
    with_row = [rows for rows in runner.decoded if 1 in rows]
    assert len(with_row) <= 4
    assert all(rows == [5] for rows in runner.decoded[len(with_row) :])
    assert len(events) <= len(with_row) + 1
    # Its tokens are free for a new request while the other one still runs.
    third = engine.submit([7, 8], SamplingParams(max_new_tokens=50))
    runner.free()
    assert len(await drain(kept)) == 50 and len(await drain(third)) == 50
    assert engine.idle


async def test_a_request_cancelled_while_waiting_is_never_prefilled(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    runner.hold()
    engine = make_engine(runner, SchedulerLimits(max_running_sequences=1))
    running = engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    waiting = engine.submit([5, 6], SamplingParams(max_new_tokens=3))
    after = engine.submit([9, 10], SamplingParams(max_new_tokens=3))
    waiting.cancel()
    runner.free()
    assert text(await drain(running)) == "cde"
    assert await drain(waiting) == []
    assert text(await drain(after)) == "klm"
    assert runner.prefill_rows == [1, 1]
    assert {rows[0] for rows in runner.decoded} == {1, 9}


async def test_a_failed_step_fails_its_requests_and_the_engine_serves_the_next(
    make_engine: EngineFactory,
) -> None:
    runner = FakeRunner()
    runner.fail_next_decode = True
    engine = make_engine(runner)
    failed = engine.submit([1, 2], SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeError, match="generation failed"):
        await drain(failed)
    assert engine.stats.requests_failed == 1
    result = await within(engine.generate([1, 2], SamplingParams(max_new_tokens=3)))
    assert result.sequences[0].text == "cde" and engine.idle
