"""The engine's admission: validation names every bad field, and the running, waiting and
total-token limits refuse or hold requests (OverCapacity carries a retry delay)."""

from __future__ import annotations

import pytest

from services.generator.engine import (
    InvalidRequest,
    OverCapacity,
    SamplingParams,
    SchedulerLimits,
    ShuttingDown,
)
from tests.unit.fakes import EngineFactory, FakeRunner, drain, eventually


async def test_a_full_waiting_queue_refuses_with_a_retry_delay(make_engine: EngineFactory) -> None:
    # Two rows free in the batch and two waiting places: the fifth request is refused.
    limits = SchedulerLimits(max_running_sequences=2, max_waiting_requests=2)
    engine = make_engine(limits=limits, start=False)
    for _ in range(4):
        engine.submit([1, 2], SamplingParams(max_new_tokens=4))
    with pytest.raises(OverCapacity) as refused:
        engine.submit([1, 2], SamplingParams(max_new_tokens=4))
    assert refused.value.reason == "WAITING_QUEUE_FULL"
    assert "2 requests already wait" in str(refused.value)
    assert 0.5 <= refused.value.retry_after <= 30.0
    assert engine.load().waiting == 4 and engine.stats.requests_admitted == 4


async def test_a_burst_during_the_first_step_fills_the_batch_and_the_queue(
    make_engine: EngineFactory,
) -> None:
    """The first burst after start: one request is in its first step when the rest arrive. The
    batch's free rows take requests beyond the waiting limit (4 running + 4 waiting = 8 admitted;
    before, the queue counted the requests about to join and refused after 1 + 4)."""
    runner = FakeRunner()
    runner.hold()
    engine = make_engine(runner, SchedulerLimits(max_running_sequences=4, max_waiting_requests=4))
    first = engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    await eventually(lambda: runner.prefill_rows == [1])  # taken: its step waits on the gate
    admitted = [first]
    with pytest.raises(OverCapacity) as refused:
        for _ in range(20):
            admitted.append(engine.submit([5, 2], SamplingParams(max_new_tokens=3)))
    assert refused.value.reason == "WAITING_QUEUE_FULL"
    assert len(admitted) == 8 and engine.stats.requests_admitted == 8
    runner.free()
    for request in admitted:
        assert len(await drain(request)) == 3
    assert max(runner.decode_rows) == 4
    # Idle again: the whole capacity is free for the next burst.
    await eventually(lambda: engine.idle)
    runner.hold()
    again = [engine.submit([9, 2], SamplingParams(max_new_tokens=3)) for _ in range(8)]
    with pytest.raises(OverCapacity):
        engine.submit([9, 2], SamplingParams(max_new_tokens=3))
    runner.free()
    for request in again:
        assert len(await drain(request)) == 3


async def test_free_rows_are_counted_in_rows_not_requests(make_engine: EngineFactory) -> None:
    # 4 free rows hold one request of 3 sequences; the next one (3 rows) must wait in the queue.
    limits = SchedulerLimits(max_running_sequences=4, max_waiting_requests=1)
    engine = make_engine(limits=limits, start=False)
    engine.submit([1, 2], SamplingParams(max_new_tokens=2, num_return_sequences=3))
    engine.submit([1, 2], SamplingParams(max_new_tokens=2, num_return_sequences=3))
    with pytest.raises(OverCapacity):
        engine.submit([1, 2], SamplingParams(max_new_tokens=2))


async def test_a_failed_step_counts_only_its_own_requests_as_failed(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    runner.hold()
    runner.fail_next_decode = True
    engine = make_engine(runner, SchedulerLimits(max_running_sequences=1))
    running = engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    await eventually(lambda: runner.prefill_rows == [1])
    waiting = engine.submit([5, 2], SamplingParams(max_new_tokens=3))
    runner.free()
    with pytest.raises(RuntimeError, match="generation failed"):
        await drain(running)
    assert len(await drain(waiting)) == 3
    assert engine.stats.requests_admitted == 2 and engine.stats.requests_failed == 1


async def test_the_total_token_budget_counts_prompt_new_tokens_and_sequences(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(limits=SchedulerLimits(max_total_tokens=100), start=False)
    engine.submit([1, 2], SamplingParams(max_new_tokens=18, num_return_sequences=2))  # 40 tokens
    engine.submit([1, 2], SamplingParams(max_new_tokens=40))  # 42 tokens
    with pytest.raises(OverCapacity) as refused:
        engine.submit([1, 2], SamplingParams(max_new_tokens=17))  # 19 more than the 18 left
    assert refused.value.reason == "TOKEN_BUDGET_EXHAUSTED" and refused.value.retry_after >= 0.5
    engine.submit([1, 2], SamplingParams(max_new_tokens=16))  # exactly the 18 left
    # A request larger than the whole budget could never run: invalid, not "retry later".
    with pytest.raises(InvalidRequest) as invalid:
        make_engine(limits=SchedulerLimits(max_total_tokens=100), start=False).submit(
            [1, 2], SamplingParams(max_new_tokens=99)
        )
    assert [name for name, _ in invalid.value.violations] == ["parameters.max_new_tokens"]


async def test_running_rows_never_exceed_the_limit_and_the_rest_wait_their_turn(
    make_engine: EngineFactory,
) -> None:
    runner = FakeRunner()
    engine = make_engine(runner, SchedulerLimits(max_running_sequences=2), start=False)
    requests = [engine.submit([tag, 2], SamplingParams(max_new_tokens=4)) for tag in (1, 5, 9)]
    two = engine.submit([13, 2], SamplingParams(max_new_tokens=3, num_return_sequences=2))
    engine.start()
    for request in [*requests, two]:
        assert (
            len(await drain(request)) == request.params.max_new_tokens * request.params.num_return_sequences
        )
    assert max(runner.decode_rows) == 2
    assert runner.prefill_rows[0] == 2 and sum(runner.prefill_rows) == 4
    # The third request joined only once a row was free, after the first two had finished.
    first_with_third = next(i for i, rows in enumerate(runner.decoded) if 9 in rows)
    assert all(1 not in rows and 5 not in rows for rows in runner.decoded[first_with_third:])


async def test_the_prefill_token_budget_splits_joiners_across_steps(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    engine = make_engine(runner, SchedulerLimits(max_prefill_tokens=5), start=False)
    requests = [engine.submit([tag, 2, 3], SamplingParams(max_new_tokens=4)) for tag in (1, 5)]
    engine.start()
    for request in requests:
        await drain(request)
    # The first joiner always fits; the second's 3 tokens exceed the 2 left of the budget.
    assert runner.prefill_rows == [1, 1]


async def test_validation_names_every_bad_field(make_engine: EngineFactory) -> None:
    engine = make_engine(FakeRunner(context_length=64), SchedulerLimits(max_running_sequences=4), start=False)
    bad = SamplingParams(
        max_new_tokens=0,
        temperature=-1.0,
        top_p=0.0,
        top_k=1000,
        repetition_penalty=0.0,
        num_return_sequences=5,
        stop=("",),
    )
    with pytest.raises(InvalidRequest) as invalid:
        engine.submit([], bad)
    assert {name for name, _ in invalid.value.violations} == {
        "prompt",
        "parameters.max_new_tokens",
        "parameters.temperature",
        "parameters.top_p",
        "parameters.top_k",
        "parameters.repetition_penalty",
        "parameters.num_return_sequences",
        "parameters.stop[0]",
    }
    with pytest.raises(InvalidRequest, match="context of 64 tokens"):
        engine.submit([1] * 10, SamplingParams(max_new_tokens=55))
    assert engine.stats.requests_admitted == 0


async def test_an_engine_that_stopped_admitting_refuses_new_requests_and_finishes_old_ones(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    running = engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    engine.stop_admitting()
    with pytest.raises(ShuttingDown):
        engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    assert len(await drain(running)) == 3
    assert await engine.wait_idle(grace=5.0)
