"""presence_penalty, frequency_penalty and logit_bias without a model: each moves the logits in the
documented direction, rows without them are untouched, the generated-token counts follow their rows
through joins and evictions, and the ranges are checked in one place for both route families."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from google.protobuf import json_format
from inference.v1 import common_pb2, openai_pb2

from services.common import sampling
from services.common.sampling import SamplingParams
from services.gateway import openai_compat, validation
from services.gateway.errors import GatewayError
from services.generator.engine import InvalidRequest, TokenEvent
from services.generator.sampling import (
    BatchKnobs,
    RowKnobs,
    apply_logit_bias,
    apply_penalties,
    penalties_of,
    record_tokens,
    sample,
)
from tests.unit.fakes import EngineFactory, FakeRunner, drain, eventually

GREEDY = RowKnobs(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
VOCAB = 8


def knobs(*rows: RowKnobs) -> BatchKnobs:
    return BatchKnobs(list(rows), [None] * len(rows))


def test_frequency_and_presence_penalties_lower_generated_tokens_by_count_and_once() -> None:
    logits = torch.zeros(3, VOCAB)
    counts = torch.zeros(3, VOCAB)
    counts[:, 2] = 3.0
    counts[:, 5] = 1.0
    batch = knobs(
        replace(GREEDY, frequency_penalty=0.5),
        replace(GREEDY, presence_penalty=1.5),
        GREEDY,
    )
    out = apply_penalties(logits, batch, penalties_of(counts, batch))
    assert out[0, 2] == -1.5 and out[0, 5] == -0.5 and out[0, 0] == 0.0
    assert out[1, 2] == -1.5 and out[1, 5] == -1.5 and out[1, 0] == 0.0
    assert torch.equal(out[2], logits[2])


def test_negative_penalties_favour_generated_tokens() -> None:
    counts = torch.zeros(1, VOCAB)
    counts[0, 4] = 2.0
    batch = knobs(replace(GREEDY, frequency_penalty=-1.0, presence_penalty=-0.5))
    out = apply_penalties(torch.zeros(1, VOCAB), batch, penalties_of(counts, batch))
    assert out[0, 4] == 2.5 and (out[0, :4] == 0.0).all()


def test_recording_tokens_step_by_step_matches_the_penalties_of_the_counts() -> None:
    batch = knobs(
        replace(GREEDY, frequency_penalty=-0.5, presence_penalty=1.0),
        replace(GREEDY, frequency_penalty=0.75),
        GREEDY,
    )
    counts, penalties = torch.zeros(3, VOCAB), torch.zeros(3, VOCAB)
    for step in ([1, 2, 3], [1, 2, 1], [4, 2, 1], [1, 5, 1]):
        record_tokens(counts, penalties, torch.tensor(step), batch)
    assert counts[0, 1] == 3 and counts[1, 2] == 3 and counts[2, 1] == 3
    assert torch.allclose(penalties, penalties_of(counts, batch))
    assert penalties[0, 1] == -0.5 and not penalties[2].any()


def test_logit_bias_adds_to_the_given_ids_of_its_own_row_only() -> None:
    logits = torch.zeros(2, VOCAB)
    out = apply_logit_bias(logits, knobs(replace(GREEDY, logit_bias=((1, -100.0), (6, 2.5))), GREEDY))
    assert out[0, 1] == -100.0 and out[0, 6] == 2.5 and out[0, 0] == 0.0
    assert torch.equal(out[1], logits[1])
    assert apply_logit_bias(logits, knobs(GREEDY, GREEDY)) is logits


def test_greedy_rows_take_the_argmax_after_bias_and_penalties() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]] * 3)
    counts = torch.zeros(3, 4)
    counts[:, 1] = 1.0
    batch = knobs(
        replace(GREEDY, logit_bias=((1, -100.0),)),
        replace(GREEDY, logit_bias=((0, 100.0),)),
        replace(GREEDY, presence_penalty=2.0),
    )
    tokens = sample(logits, None, batch, penalties_of(counts, batch)).tokens
    assert tokens.tolist() == [2, 0, 2]
    plain_knobs = knobs(GREEDY, GREEDY, GREEDY)
    plain = sample(logits, None, plain_knobs, penalties_of(counts, plain_knobs)).tokens
    assert plain.tolist() == [1, 1, 1]


def test_logit_bias_comes_before_the_repetition_penalty() -> None:
    # Token 1 (logit 1.0, seen) +1.5 bias = 2.5, then halved to 1.25: below token 2's 1.4. Biasing
    # after the penalty would give 0.5 + 1.5 = 2.0 and pick token 1.
    logits = torch.tensor([[0.0, 1.0, 1.4]])
    presence = torch.tensor([[False, True, False]])
    row = replace(GREEDY, repetition_penalty=2.0, logit_bias=((1, 1.5),))
    tokens = sample(logits, presence, knobs(row)).tokens
    assert tokens.tolist() == [2]


# The fake runner's rule here repeats "a": greedy decoding without penalties gives "aaaa...".
def always_a(token: int) -> int:
    return 1


def texts(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


async def test_frequency_and_presence_penalties_reduce_repetition(make_engine: EngineFactory) -> None:
    engine = make_engine(FakeRunner(successor=always_a, peak=2.5))
    base = SamplingParams(max_new_tokens=10)
    plain = texts(await drain(engine.submit([2], base)))
    assert plain == [1] * 10
    for params in (replace(base, frequency_penalty=2.0), replace(base, presence_penalty=2.0)):
        penalized = texts(await drain(engine.submit([2], params)))
        assert max(penalized.count(t) for t in set(penalized)) < 10, params
        assert len(set(penalized)) > 1, params
    # A negative penalty keeps the repetition.
    assert texts(await drain(engine.submit([2], replace(base, frequency_penalty=-2.0)))) == plain


async def test_logit_bias_bans_and_forces_tokens(make_engine: EngineFactory) -> None:
    engine = make_engine()
    base = SamplingParams(max_new_tokens=3)
    assert texts(await drain(engine.submit([1, 2], base))) == [3, 4, 5]
    banned = texts(await drain(engine.submit([1, 2], replace(base, logit_bias=((3, -100.0),)))))
    assert 3 not in banned
    forced = texts(await drain(engine.submit([1, 2], replace(base, logit_bias=((9, 100.0),)))))
    assert forced == [9, 9, 9]


async def test_counts_follow_their_rows_through_joins_and_evictions(make_engine: EngineFactory) -> None:
    """A penalized request gives the same tokens alone and in a batch whose rows join and leave
    around it, and unpenalized neighbours give their own tokens unchanged."""
    runner = FakeRunner(successor=lambda token: 1 + token % 3)
    engine = make_engine(runner)
    penalized = SamplingParams(max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.5)
    plain = SamplingParams(max_new_tokens=12)
    alone = texts(await drain(engine.submit([4], penalized)))
    assert alone != texts(await drain(engine.submit([4], plain))), "the penalty must change the output"
    plain_alone = texts(await drain(engine.submit([5], plain)))
    other_alone = texts(await drain(engine.submit([7], replace(penalized, presence_penalty=1.0))))

    runner.hold()
    steps = len(runner.decoded)
    short = engine.submit([6], SamplingParams(max_new_tokens=2))  # leaves first: rows shift down
    target = engine.submit([4], penalized)
    runner.allow(3)
    await eventually(lambda: len(runner.decoded) == steps + 3)
    joiner = engine.submit([5], plain)  # joins a batch that keeps counts: gets a zero row
    other = engine.submit([7], replace(penalized, presence_penalty=1.0))
    runner.free()
    assert texts(await drain(target)) == alone
    assert texts(await drain(joiner)) == plain_alone
    assert texts(await drain(other)) == other_alone
    await drain(short)


async def test_counts_are_kept_only_while_a_row_needs_them(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    engine = make_engine(runner)
    runner.hold()
    long = engine.submit([1], SamplingParams(max_new_tokens=8))
    runner.allow(1)
    await eventually(lambda: len(runner.decoded) == 1)
    assert engine._batch.counts is None
    short = engine.submit([2], SamplingParams(max_new_tokens=2, presence_penalty=1.0))
    runner.allow(1)
    await eventually(lambda: len(runner.decoded) == 2)
    assert engine._batch.counts is not None and engine._batch.counts.shape[0] == 2
    runner.allow(2)
    await eventually(lambda: len(runner.decoded) == 4)
    assert len(engine._batch.rows) == 1 and engine._batch.counts is None
    runner.free()
    await drain(short)
    await drain(long)


async def test_the_engine_refuses_ids_beyond_the_vocabulary(make_engine: EngineFactory) -> None:
    engine = make_engine(start=False)
    vocab = engine.vocab_size
    with pytest.raises(InvalidRequest) as invalid:
        engine.submit([1], SamplingParams(max_new_tokens=2, logit_bias=((3, 1.0), (vocab, 1.0))))
    ((field, why),) = invalid.value.violations
    assert field == f"parameters.logit_bias[{vocab}]" and str(vocab) in why


@pytest.mark.parametrize(
    ("params", "field", "text"),
    [
        (SamplingParams(1, presence_penalty=2.5), "parameters.presence_penalty", "[-2, 2]"),
        (SamplingParams(1, frequency_penalty=-3.0), "parameters.frequency_penalty", "[-2, 2]"),
        (SamplingParams(1, frequency_penalty=float("nan")), "parameters.frequency_penalty", "[-2, 2]"),
        (SamplingParams(1, logit_bias=((5, 101.0),)), "parameters.logit_bias[5]", "[-100, 100]"),
        (SamplingParams(1, logit_bias=((-1, 1.0),)), "parameters.logit_bias[-1]", "negative"),
        (
            SamplingParams(1, logit_bias=tuple((i, 1.0) for i in range(301))),
            "parameters.logit_bias",
            "limit of 300",
        ),
        (
            SamplingParams(1, num_beams=2, logit_bias=((5, 1.0),)),
            "parameters.logit_bias",
            "num_beams",
        ),
        (SamplingParams(1, num_beams=2, presence_penalty=0.5), "parameters.presence_penalty", "num_beams"),
    ],
)
def test_out_of_range_knobs_are_named_with_their_limit(params: SamplingParams, field: str, text: str) -> None:
    problems = dict(sampling.params_violations(params))
    assert field in problems and text in problems[field], problems


def test_the_wire_knobs_reach_the_engine_and_keep_a_request_greedy() -> None:
    parameters = json_format.ParseDict(
        {"presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"17": -100, "3": 2}},
        common_pb2.SamplingParameters(),
    )
    params = sampling.from_proto(parameters, 8)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((3, 2.0), (17, -100.0))
    assert not params.do_sample and sampling.is_deterministic(parameters)


def test_openai_requests_carry_the_penalties_and_logit_bias() -> None:
    request = openai_pb2.CreateChatCompletionRequest(
        model="m", presence_penalty=0.25, frequency_penalty=1.0, logit_bias={50: -100.0}
    )
    parameters = openai_compat.sampling_parameters(request)
    assert parameters.presence_penalty == 0.25 and parameters.frequency_penalty == 1.0
    assert dict(parameters.logit_bias) == {50: -100.0}
    completion = openai_pb2.CreateCompletionRequest(model="m", logit_bias={7: 5.0})
    assert dict(openai_compat.sampling_parameters(completion).logit_bias) == {7: 5.0}
    assert not openai_compat.sampling_parameters(completion).HasField("presence_penalty")


def test_openai_violations_name_openai_fields_once() -> None:
    request = openai_pb2.CreateChatCompletionRequest(
        model="m",
        messages=[openai_pb2.ChatCompletionMessage(role="user")],
        presence_penalty=2.5,
        frequency_penalty=-2.5,
        logit_bias={9: 200.0},
    )
    with pytest.raises(GatewayError) as bad:
        validation.validate_chat_completion(request, validation.RequestLimits())
    fields = [v.field for detail in bad.value.details for v in getattr(detail, "field_violations", [])]
    assert sorted(fields) == ["frequency_penalty", "logit_bias[9]", "presence_penalty"]
