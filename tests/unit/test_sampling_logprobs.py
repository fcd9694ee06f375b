"""Logprobs with fakes: the sampler reads them from the distribution it draws from before its
top-k/top-p cut, alternatives only for the rows that ask, prompt logprobs through the generic
fallback, the limits, each token's own text and bytes, and the gateway's OpenAI shapes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
import pytest
import torch
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from inference.v1 import common_pb2, generation_pb2, openai_pb2

from services.common.sampling import SamplingParams, params_violations
from services.gateway import openai_compat as oai
from services.gateway import validation
from services.gateway.errors import GatewayError
from services.generator.engine import SamplingParams as EngineParams
from services.generator.sampling import BatchKnobs, RowKnobs, sample
from services.generator.textstream import TokenPieces
from tests.unit.fakes import EngineFactory, FakeRunner, drain, within

GREEDY = RowKnobs(False, 1.0, 0, 1.0, 1.0)


def logits_of(rows: int, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_logprobs_are_the_log_softmax_and_top_is_sorted_with_the_choice_first() -> None:
    logits = logits_of(3)
    knobs = BatchKnobs([GREEDY, RowKnobs(False, 1.0, 0, 1.0, 1.0, 5), GREEDY], [None] * 3)
    sampled = sample(logits, None, knobs)
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.equal(sampled.tokens, logits.argmax(dim=-1))
    assert torch.allclose(sampled.logprobs, expected.gather(1, sampled.tokens[:, None]).squeeze(1), atol=1e-5)
    assert sampled.top is not None and sampled.top.rows == [1]
    values = sampled.top.logprobs[0]
    assert sampled.top.ids.shape == (1, 5)
    assert torch.all(values[:-1] >= values[1:])
    assert int(sampled.top.ids[0, 0]) == int(sampled.tokens[1])
    assert torch.allclose(values, expected[1].topk(5).values, atol=1e-5)


def test_no_alternatives_are_computed_when_no_row_asks() -> None:
    sampled = sample(logits_of(2), None, BatchKnobs([GREEDY, GREEDY], [None, None]))
    assert sampled.top is None


def test_sampled_logprobs_follow_temperature_but_not_the_top_k_cut() -> None:
    logits = logits_of(2, seed=1)
    # top_k=1 leaves one token, whose probability after the cut would be 1 (logprob 0).
    rows = [RowKnobs(True, 0.5, 1, 1.0, 1.0), RowKnobs(True, 2.0, 0, 0.3, 1.0)]
    generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    sampled = sample(logits, None, BatchKnobs(rows, generators))
    scaled = logits / torch.tensor([[0.5], [2.0]])
    expected = torch.log_softmax(scaled, dim=-1).gather(1, sampled.tokens[:, None]).squeeze(1)
    assert torch.allclose(sampled.logprobs, expected, atol=1e-5)
    assert float(sampled.logprobs[0]) < -1e-3
    assert int(sampled.tokens[0]) == int(logits[0].argmax())


def test_alternatives_of_a_cut_row_come_from_before_the_cut() -> None:
    logits = logits_of(2, seed=5)
    rows = [RowKnobs(True, 0.5, 2, 1.0, 1.0, 4), RowKnobs(True, 1.0, 0, 1.0, 1.0, 2)]
    sampled = sample(logits, None, BatchKnobs(rows, [torch.Generator().manual_seed(6), None]))
    expected = torch.log_softmax(logits / torch.tensor([[0.5], [1.0]]), dim=-1)
    assert sampled.top is not None and sampled.top.rows == [0, 1]
    assert torch.allclose(sampled.top.logprobs[0], expected[0].topk(4).values, atol=1e-5)
    assert torch.allclose(sampled.top.logprobs[1, :2], expected[1].topk(2).values, atol=1e-5)
    chosen = expected.gather(1, sampled.tokens[:, None]).squeeze(1)
    assert torch.allclose(sampled.logprobs, chosen, atol=1e-5)


def test_logprobs_are_taken_after_the_repetition_penalty() -> None:
    logits = logits_of(1, seed=2)
    presence = torch.zeros_like(logits, dtype=torch.bool)
    presence[0, int(logits[0].argmax())] = True
    knobs = BatchKnobs([RowKnobs(False, 1.0, 0, 1.0, 2.0, 2)], [None])
    sampled = sample(logits, presence, knobs)
    penalized = torch.where(presence, torch.where(logits > 0, logits / 2.0, logits * 2.0), logits)
    expected = torch.log_softmax(penalized, dim=-1)
    assert int(sampled.tokens[0]) == int(penalized.argmax())
    assert torch.allclose(sampled.logprobs, expected[0, sampled.tokens], atol=1e-5)
    assert sampled.top is not None
    assert torch.allclose(sampled.top.logprobs[0], expected[0].topk(2).values, atol=1e-5)


def fake_logprobs(runner: FakeRunner, last: int) -> torch.Tensor:
    return torch.log_softmax(runner._logits([last])[0], dim=-1)


async def test_engine_returns_each_tokens_logprob_and_alternatives(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    engine = make_engine(runner)
    params = EngineParams(max_new_tokens=4, logprobs=True, top_logprobs=3)
    result = await within(engine.generate([1, 2], params))
    (sequence,) = result.sequences
    assert [e.token_id for e in sequence.tokens] == [3, 4, 5, 6]
    previous = 2
    for event in sequence.tokens:
        expected = fake_logprobs(runner, previous)
        assert event.logprob == pytest.approx(float(expected[event.token_id]), abs=1e-5)
        assert [i for i, _ in event.top] == expected.topk(3).indices.tolist()
        assert event.top[0][0] == event.token_id
        previous = event.token_id
    assert result.prompt_logprobs is None


async def test_a_request_without_logprobs_keeps_no_token_list(make_engine: EngineFactory) -> None:
    result = await within(make_engine().generate([1, 2], EngineParams(max_new_tokens=3)))
    assert result.sequences[0].tokens == []


async def test_prompt_logprobs_through_the_generic_fallback(make_engine: EngineFactory) -> None:
    runner = FakeRunner()
    engine = make_engine(runner)
    prompt = [1, 2, 9, 4]
    params = EngineParams(max_new_tokens=1, prompt_logprobs=True, top_logprobs=2)
    result = await within(engine.generate(prompt, params))
    assert result.prompt_logprobs is not None
    first, *rest = result.prompt_logprobs
    assert (first.token_id, first.logprob, first.top) == (1, None, [])
    for before, item in zip(prompt, rest, strict=False):
        expected = fake_logprobs(runner, before)
        assert item.logprob == pytest.approx(float(expected[item.token_id]), abs=1e-5)
        assert [i for i, _ in item.top] == expected.topk(2).indices.tolist()
    assert [item.token_id for item in result.prompt_logprobs] == prompt


class FailingPromptRunner(FakeRunner):
    def position_logits(self, tokens: list[int]) -> Iterator[torch.Tensor]:
        raise RuntimeError("no logits for you")
        yield torch.zeros(0)


async def test_a_failed_prompt_pass_fails_its_request_only(make_engine: EngineFactory) -> None:
    runner = FailingPromptRunner()
    runner.hold()
    engine = make_engine(runner)
    plain = engine.submit([1, 2], EngineParams(max_new_tokens=3))
    echo = engine.submit([1, 2], EngineParams(max_new_tokens=3, prompt_logprobs=True))
    runner.free()
    with pytest.raises(RuntimeError, match="no logits for you"):
        await drain(echo)
    assert [e.token_id for e in await drain(plain)] == [3, 4, 5]
    assert engine.stats.requests_failed == 1


async def test_a_one_token_prompt_has_one_prompt_token_without_logprob(make_engine: EngineFactory) -> None:
    params = EngineParams(max_new_tokens=1, prompt_logprobs=True, top_logprobs=2)
    result = await within(make_engine().generate([5], params))
    assert result.prompt_logprobs is not None
    assert [(p.token_id, p.logprob, p.top) for p in result.prompt_logprobs] == [(5, None, [])]


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        (SamplingParams(max_new_tokens=1, top_logprobs=21), "parameters.top_logprobs", "between 0 and 20"),
        (SamplingParams(max_new_tokens=1, top_logprobs=-1), "parameters.top_logprobs", "between 0 and 20"),
        (
            SamplingParams(max_new_tokens=1, num_beams=2, logprobs=True),
            "parameters.logprobs",
            "beam search",
        ),
        (
            SamplingParams(max_new_tokens=1, num_beams=2, prompt_logprobs=True),
            "parameters.prompt_logprobs",
            "beam search",
        ),
    ],
)
def test_limits_name_the_field(params: SamplingParams, field: str, words: str) -> None:
    bad = params_violations(params)
    assert any(name == field and words in why for name, why in bad), bad


class ByteTokenizer:
    """Byte-level BPE pieces: id 0 is "Ġhi", id 1 the first byte of "é" alone, id 2 "é" whole."""

    raw = ("Ġhi", "Ã", "Ã©")
    text = (" hi", "\ufffd", "é")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.text[i] for i in ids)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.raw[i] for i in ids]


def test_token_pieces_keep_partial_utf8_bytes() -> None:
    pieces = TokenPieces(ByteTokenizer())
    assert pieces(0) == (" hi", b" hi")
    assert pieces(1) == ("\ufffd", b"\xc3")
    assert pieces(2) == ("é", "é".encode())


# --- the gateway's OpenAI shapes and limits -----------------------------------------------------


def token(
    token_id: int, piece: str, logprob: float, text: str | None = None, special: bool = False
) -> common_pb2.Token:
    alternative = common_pb2.TopLogprob(id=token_id, text=piece, logprob=logprob, bytes=piece.encode())
    other = common_pb2.TopLogprob(id=99, text="x", logprob=logprob - 1, bytes=b"x")
    return common_pb2.Token(
        id=token_id,
        text=piece if text is None else text,
        logprob=logprob,
        special=special,
        piece=piece,
        piece_bytes=piece.encode(),
        top_logprobs=[alternative, other],
    )


def stream_message(item: common_pb2.Token, finish: bool = False) -> generation_pb2.GenerateStreamResponse:
    message = generation_pb2.GenerateStreamResponse(request_id="r", index=0, token=item)
    if finish:
        message.finish_reason = common_pb2.FINISH_REASON_EOS_TOKEN
    return message


def test_chat_chunks_carry_withheld_tokens_with_the_next_text_and_skip_eos() -> None:
    chunker = oai.ChatChunker("m", include_usage=False, logprobs=True)
    chunks = [
        *chunker.feed(stream_message(token(1, "\ufffd", -0.5, text=""))),
        *chunker.feed(stream_message(token(2, "\ufffd", -0.25, text="é"))),
        *chunker.feed(stream_message(token(0, "<eos>", -0.1, text="", special=True), finish=True)),
    ]
    bodies = [oai.chat_chunk_json(chunk)["choices"][0] for chunk in chunks]
    with_logprobs = [body for body in bodies if body["logprobs"] is not None]
    assert len(with_logprobs) == 1 and with_logprobs[0]["delta"]["content"] == "é"
    content = with_logprobs[0]["logprobs"]["content"]
    assert [entry["logprob"] for entry in content] == [-0.5, -0.25]
    assert content[0]["top_logprobs"][1] == {"token": "x", "logprob": -1.5, "bytes": [120]}


def test_completion_logprobs_put_null_first_with_echo_and_count_offsets() -> None:
    response = generation_pb2.GenerateResponse(
        request_id="r",
        prompt_tokens=[token(5, "Hi", 0.0), token(6, " there", -2.0)],
        sequences=[common_pb2.GeneratedSequence(index=0, text="!", tokens=[token(7, "!", -0.5)])],
    )
    reply = oai.completion_response([response], ["Hi there"], echo=True, model="m", logprobs=True)
    body = json_format.MessageToDict(reply.choices[0].logprobs, preserving_proto_field_name=True)
    assert body["tokens"] == ["Hi", " there", "!"]
    assert body["token_logprobs"] == [None, -2.0, -0.5]
    assert body["top_logprobs"][0] is None and body["top_logprobs"][2] == {"!": -0.5, "x": -1.5}
    assert body["text_offset"] == [0, 2, 8]
    assert not reply.choices[0].text.startswith("!") and reply.choices[0].text == "Hi there!"


@pytest.mark.parametrize(
    ("request_message", "field", "words"),
    [
        (
            openai_pb2.CreateCompletionRequest(
                model="m", prompt=struct_pb2.Value(string_value="a"), logprobs=6
            ),
            "logprobs",
            "between 0 and 5",
        ),
        (
            openai_pb2.CreateChatCompletionRequest(
                model="m",
                messages=[
                    openai_pb2.ChatCompletionMessage(role="user", content=struct_pb2.Value(string_value="a"))
                ],
                logprobs=True,
                top_logprobs=21,
            ),
            "top_logprobs",
            "between 0 and 20",
        ),
        (
            openai_pb2.CreateChatCompletionRequest(
                model="m",
                messages=[
                    openai_pb2.ChatCompletionMessage(role="user", content=struct_pb2.Value(string_value="a"))
                ],
                top_logprobs=2,
            ),
            "top_logprobs",
            "logprobs",
        ),
    ],
)
def test_openai_logprob_limits_name_the_field(
    request_message: openai_pb2.CreateCompletionRequest | openai_pb2.CreateChatCompletionRequest,
    field: str,
    words: str,
) -> None:
    with pytest.raises(GatewayError) as bad:
        if isinstance(request_message, openai_pb2.CreateCompletionRequest):
            validation.validate_completion(request_message, validation.RequestLimits())
        else:
            validation.validate_chat_completion(request_message, validation.RequestLimits())
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    (detail,) = bad.value.details
    assert isinstance(detail, error_details_pb2.BadRequest)
    found = {item.field: item.description for item in detail.field_violations}
    assert set(found) == {field} and words in found[field], found
