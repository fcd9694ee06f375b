"""Chunked prefill in the engine over a fake chunking runner: a request that fails when its prompt
is done, or in a step that fails after prompts finished, ends with an error and frees its share;
a prompt that waits for a shared prefix holds back no unrelated prompt; any positive step budget
leaves prompts room."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from services.generator.engine import Engine, SamplingParams, SchedulerLimits, prompt_budget
from tests.unit.fakes import EngineFactory, FakeRunner, drain, eventually, within


class FakeChunkedRunner(FakeRunner):
    """A FakeRunner that also prefills prompts a chunk at a time (no prefix cache, except that
    `cached` may claim one for every prompt); records each step's chunks, fails the next merge
    when told, and fails the prompt logprobs pass of any prompt that holds `poison`."""

    def __init__(self, poison: int | None = None, cached: int | None = None) -> None:
        super().__init__()
        self.poison = poison
        self.cached = cached
        self.fail_next_merge = False
        # Per prefill_chunks call, (first prompt token, count) of each piece.
        self.chunks: list[list[tuple[int, int]]] = []

    def cached_prefix(self, prompt: Sequence[int]) -> int | None:
        return self.cached

    def open_rows(self, state: Any, prompts: Sequence[Sequence[int]]) -> tuple[Any, list[int]]:
        rows: list[list[int]] = [] if state is None else state
        held = self.cached or 0
        return [*rows, *(list(prompt[:held]) for prompt in prompts)], [held for _ in prompts]

    def prefill_chunks(self, state: Any, pieces: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        rows: list[list[int]] = state
        for row, prompt, count in pieces:
            done = len(rows[row])
            rows[row].extend(prompt[done : done + count])
        self.chunks.append([(prompt[0], count) for _, prompt, count in pieces])
        return self._logits([rows[row][-1] for row, _, _ in pieces])

    def merge(self, first: Any, second: Any) -> Any:
        if self.fail_next_merge:
            self.fail_next_merge = False
            raise RuntimeError("the fake runner failed a merge")
        return super().merge(first, second)

    def position_logits(self, tokens: Sequence[int]) -> Iterator[torch.Tensor]:
        if self.poison is not None and self.poison in tokens:
            raise ValueError("poisoned prompt")
        yield self._logits(list(tokens))


def assert_released(engine: Engine) -> None:
    load = engine.load()
    assert engine.idle and engine._reserved_tokens == 0 and engine._rows_taken == 0
    assert load.running == 0 and load.waiting == 0
    assert engine._filling == [] and engine._fill_state is None


async def test_a_chunked_prompt_whose_prompt_logprobs_fail_ends_with_an_error_and_frees_its_share(
    make_engine: EngineFactory,
) -> None:
    runner = FakeChunkedRunner(poison=9)
    engine = make_engine(runner, SchedulerLimits(max_step_tokens=4))
    # Twelve tokens in chunks of at most four: the pass runs steps after the request was taken.
    poisoned = engine.submit(
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], SamplingParams(max_new_tokens=3, prompt_logprobs=True)
    )
    healthy = engine.submit([2, 3], SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="generation failed: poisoned prompt"):
        await drain(poisoned)
    assert len(runner.chunks) > 1
    assert "".join(event.text for event in await drain(healthy)) == "def"
    await eventually(lambda: engine.idle)
    assert engine.stats.requests_failed == 1
    assert_released(engine)
    assert await within(engine.wait_idle(5.0))


async def test_a_step_that_fails_after_prompts_finished_fails_them_and_frees_their_share(
    make_engine: EngineFactory,
) -> None:
    runner = FakeChunkedRunner()
    runner.hold()
    engine = make_engine(runner, SchedulerLimits(max_step_tokens=8))
    running = engine.submit([1, 2], SamplingParams(max_new_tokens=50))
    runner.allow(1)
    await eventually(lambda: len(runner.decoded) == 1)
    # Taken in one step (7 of the 8 tokens: one goes to the running row), its prompt ends in the
    # next, whose merge into the running batch fails.
    runner.fail_next_merge = True
    joining = [engine.submit(list(range(3, 13)), SamplingParams(max_new_tokens=5))]
    runner.free()
    for request in [running, *joining]:
        with pytest.raises(RuntimeError, match="generation failed: the fake runner failed a merge"):
            await drain(request)
    await eventually(lambda: engine.idle)
    assert engine.stats.requests_failed == 2
    assert runner.chunks[-2:] == [[(3, 7)], [(3, 3)]]
    assert_released(engine)
    # The engine serves the next one.
    result = await within(engine.generate([1, 2], SamplingParams(max_new_tokens=3)))
    assert result.sequences[0].text == "cde"


async def test_a_prompt_waiting_for_a_shared_prefix_lets_unrelated_prompts_use_the_budget(
    make_engine: EngineFactory,
) -> None:
    # A "cache" of one token: a prompt sharing 17 or more tokens with one being prefilled waits.
    runner = FakeChunkedRunner(cached=1)
    runner.hold()
    engine = make_engine(runner, SchedulerLimits(max_step_tokens=64))
    shared = list(range(1, 31))
    first = engine.submit([*shared, 5], SamplingParams(max_new_tokens=2))
    second = engine.submit([*shared, 6], SamplingParams(max_new_tokens=2))
    other = engine.submit([7, 8, 9], SamplingParams(max_new_tokens=2))
    runner.free()
    for request in (first, second, other):
        await drain(request)
    # The first step prefilled the first and the unrelated prompt; the second waited its turn.
    assert runner.chunks[0] == [(1, 30), (7, 2)]  # (each less its cached token)
    assert runner.chunks[1] == [(1, 30)]
    assert_released(engine)


def test_running_rows_that_fill_the_step_budget_leave_prompts_a_quarter_of_it() -> None:
    assert prompt_budget(256, 10) == 246
    assert prompt_budget(256, 256) == 64
    assert prompt_budget(256, 1024) == 64
    assert prompt_budget(2, 5) == 1
