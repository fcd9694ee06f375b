"""bitsandbytes quantization: a 4-bit (nf4) generator process serves the packaged model with its
weights really quantized, and a combination the platform cannot run stops start-up with the reason."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import pytest
import torch
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.fixtures_generator import GeneratorService, start_generator
from tests.stack import ServiceProcess, free_port

TIMEOUT = 180.0
FRANCE = [common_pb2.ChatMessage(role="user", content="What is the capital of France?")]
# SmolLM2-135M holds 135 M parameters: 269 MB in bf16, 538 MB in fp32 (get_memory_footprint).
# nf4 packs the linear layers into half a byte per weight (plus block scales); the tied embedding
# stays in bf16: 110 MB in all here.
MOST_4BIT_MEGABYTES = 200.0


@pytest.fixture(scope="module")
def nf4_generator() -> Iterator[GeneratorService]:
    service = start_generator(["--quantization", "4bit", "--max-running-sequences", "4"])
    yield service
    service.stop()


def test_a_4bit_generator_loads_nf4_weights_and_answers_paris(nf4_generator: GeneratorService) -> None:
    with grpc.insecure_channel(nf4_generator.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = stub.Chat(
            generation_pb2.ChatRequest(
                messages=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=16)
            ),
            timeout=TIMEOUT,
        )
    # nf4 shifts the logits enough to lengthen the greedy answer, but not to change the fact.
    assert reply.message.content.startswith("The capital of France is Paris")
    assert reply.usage.completion_tokens == reply.tokens_generated > 6
    match = re.search(r"([\d.]+) MB of weights, quantization 4bit", nf4_generator.process.log_tail(200))
    assert match, nf4_generator.process.log_tail()
    assert float(match.group(1)) < MOST_4BIT_MEGABYTES


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--attn-implementation", "flash_attention_2"], "flash_attention_2 needs a CUDA GPU"),
        (["--device", "cuda"], "CUDA is not available on this machine; use --device cpu"),
    ],
)
def test_a_quantized_start_the_platform_cannot_run_exits_with_the_reason(
    flags: list[str], reason: str
) -> None:
    process = ServiceProcess.python_module(
        "generator-4bit-refused",
        "services.generator",
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        "--quantization",
        "4bit",
        *flags,
    ).start()
    assert process.process is not None
    try:
        code = process.process.wait(timeout=120)
    finally:
        process.stop(grace=5)
    assert code == 2, process.log_tail()
    assert reason in process.log_tail()
