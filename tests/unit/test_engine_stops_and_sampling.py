"""What a sequence emits and why it ends: max_new_tokens, EOS and stop sequences (also across
tokens, never emitted), and seeded sampling that draws the same tokens alone and in a batch."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.generator.engine import SamplingParams, TokenEvent
from tests.unit.fakes import EOS, EngineFactory, FakeRunner, FakeTokenizer, drain, next_letter, within

# With the fake runner, the prompt "ab" (ids 1, 2) continues greedily as "cdefgh..."; after "z"
# come " ", "he", "llo", " wor", "ld", "!".
AB = [1, 2]
Z = [26]


def ends_after_e(token: int) -> int:
    return EOS if token == 5 else next_letter(token)


async def test_max_new_tokens_ends_a_sequence_with_length(make_engine: EngineFactory) -> None:
    result = await within(make_engine().generate(AB, SamplingParams(max_new_tokens=5)))
    (sequence,) = result.sequences
    assert (sequence.text, sequence.tokens_generated, sequence.finish_reason) == ("cdefg", 5, "length")
    assert result.prompt_tokens == 2 and result.completion_tokens == 5


async def test_eos_ends_a_sequence_and_adds_no_text(make_engine: EngineFactory) -> None:
    engine = make_engine(FakeRunner(successor=ends_after_e))
    events = await drain(engine.submit(AB, SamplingParams(max_new_tokens=50)))
    assert [e.text for e in events] == ["c", "d", "e", ""]
    assert events[-1].token_id == EOS and events[-1].finish_reason == "eos" and events[-1].special


@pytest.mark.parametrize(
    ("prompt", "stop", "text"),
    [
        (AB, ("e",), "cd"),
        (AB, ("de",), "c"),  # split across two tokens
        (AB, ("x", "f", "d"), "c"),  # the earliest of several
        (Z, ("llo",), " he"),  # exactly one token
        (Z, ("lo w",), " hel"),  # inside two multi-character tokens
        (Z, ("ld!",), " hello wor"),
    ],
)
async def test_a_stop_sequence_ends_the_text_before_it_and_is_never_emitted(
    make_engine: EngineFactory, prompt: list[int], stop: tuple[str, ...], text: str
) -> None:
    events = await drain(make_engine().submit(prompt, SamplingParams(max_new_tokens=20, stop=stop)))
    assert "".join(e.text for e in events) == text
    assert events[-1].finish_reason == "stop"
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)


async def test_text_held_for_a_possible_stop_is_released_when_it_does_not_match(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    events = await drain(engine.submit(AB, SamplingParams(max_new_tokens=4, stop=("dx",))))
    assert [e.text for e in events] == ["c", "", "de", "f"]
    # Held text at the end of a sequence comes out with its last token, for length and EOS alike.
    events = await drain(engine.submit(AB, SamplingParams(max_new_tokens=4, stop=("fx",))))
    assert [e.text for e in events] == ["c", "d", "e", "f"] and events[-1].finish_reason == "length"
    eos_engine = make_engine(FakeRunner(successor=ends_after_e))
    events = await drain(eos_engine.submit(AB, SamplingParams(max_new_tokens=9, stop=("ex",))))
    assert [e.text for e in events] == ["c", "d", "", "e"] and events[-1].finish_reason == "eos"


async def test_each_returned_sequence_ends_on_its_own(make_engine: EngineFactory) -> None:
    params = SamplingParams(max_new_tokens=6, num_return_sequences=3, stop=("e",))
    result = await within(make_engine().generate(AB, params))
    assert [(s.index, s.text, s.finish_reason) for s in result.sequences] == [
        (0, "cd", "stop"),
        (1, "cd", "stop"),
        (2, "cd", "stop"),
    ]


def tokens(events: list[TokenEvent], index: int = 0) -> list[int]:
    return [e.token_id for e in events if e.index == index]


SEEDED = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.0, seed=1234)


async def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_changing_batch(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    alone = tokens(await drain(engine.submit(AB, SEEDED)))
    greedy = [3 + i for i in range(12)]
    assert alone != greedy, "the fake's distribution must leave room to sample"

    neighbours = [
        engine.submit([7, 8], SamplingParams(max_new_tokens=3, do_sample=True)),
        engine.submit([9], SamplingParams(max_new_tokens=20, do_sample=True, seed=99, top_k=5)),
    ]
    seeded = engine.submit(AB, SEEDED)
    more = engine.submit([4], SamplingParams(max_new_tokens=5, repetition_penalty=1.3))
    in_batch = tokens(await drain(seeded))
    for request in [*neighbours, more]:
        await drain(request)
    assert in_batch == alone
    other_seed = tokens(await drain(engine.submit(AB, replace(SEEDED, seed=4321))))
    assert other_seed != alone


async def test_the_sequences_of_one_seeded_request_differ_and_each_is_reproducible(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    params = replace(SEEDED, num_return_sequences=2)
    first = await drain(engine.submit(AB, params))
    again = await drain(engine.submit(AB, params))
    assert tokens(first, 0) != tokens(first, 1)
    assert (tokens(first, 0), tokens(first, 1)) == (tokens(again, 0), tokens(again, 1))


async def test_chat_messages_are_encoded_through_the_chat_template(make_engine: EngineFactory) -> None:
    engine = make_engine(tokenizer=FakeTokenizer())
    ids = engine.encode_chat([("user", "hello")])
    assert engine.tokenizer.decode(ids) == "user hello a "
    assert engine.encode_prompt("hello world") == engine.tokenizer.encode("hello world")
