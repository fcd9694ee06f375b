"""A second, small generator (fp32, 4 running sequences, 4 waiting) for reproducibility inside a
busy batch, admission limits and graceful shutdown; and start-up refusals."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.fixtures_generator import GeneratorService, start_generator
from tests.stack import ROOT, ServiceProcess, free_port, sigterm_while_loading

TIMEOUT = 180.0
STORY = [common_pb2.ChatMessage(role="user", content="Write a very long story about a dragon and a knight.")]


@pytest.fixture(scope="module")
def small_generator() -> Iterator[GeneratorService]:
    # fp32: in bf16 a row's logits change in the last bits with the batch's shape, which can flip a
    # sampled token after a dozen steps; in fp32 a seeded row gives the same text in any batch.
    service = start_generator(
        [
            "--dtype",
            "float32",
            "--max-running-sequences",
            "4",
            "--max-waiting-requests",
            "4",
            "--shutdown-grace-seconds",
            "60",
        ]
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def small_stub(small_generator: GeneratorService) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(small_generator.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def seeded(prompt: str, seed: int, max_new_tokens: int = 24) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        parameters=common_pb2.SamplingParameters(
            max_new_tokens=max_new_tokens, temperature=0.9, top_p=0.95, top_k=50, seed=seed
        ),
    )


def test_seeded_sampling_is_reproducible_alone_and_in_a_busy_batch(
    small_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    check_seeded_sampling_is_reproducible_alone_and_in_a_busy_batch(small_stub)


def check_seeded_sampling_is_reproducible_alone_and_in_a_busy_batch(
    stub: generation_pb2_grpc.GenerationServiceStub, busy_requests: int = 3
) -> None:
    request = seeded("Once upon a time, in a small village,", seed=1234)
    alone = stub.Generate(request, timeout=TIMEOUT).generated_text
    again = stub.Generate(request, timeout=TIMEOUT).generated_text
    assert alone == again
    others = [
        seeded(f"My favourite food number {i} is", seed=i, max_new_tokens=40) for i in range(busy_requests)
    ]
    with ThreadPoolExecutor(busy_requests + 1) as pool:
        busy = [pool.submit(stub.Generate, other, timeout=TIMEOUT) for other in others]
        time.sleep(0.3)  # the seeded request joins a batch that is already decoding
        in_batch = pool.submit(stub.Generate, request, timeout=TIMEOUT)
        assert in_batch.result().generated_text == alone
        assert all(f.result().generated_text for f in busy)
    different = stub.Generate(seeded("Once upon a time, in a small village,", seed=99), timeout=TIMEOUT)
    assert different.generated_text != alone


def test_over_admission_gives_resource_exhausted_with_retry_info(
    small_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    request = generation_pb2.GenerateRequest(
        messages=STORY, parameters=common_pb2.SamplingParameters(max_new_tokens=24, temperature=0.8, seed=5)
    )
    outcomes: list[Any] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            small_stub.Generate(request, timeout=TIMEOUT)
            result: Any = "ok"
        except grpc.RpcError as error:
            result = error
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=call) for _ in range(14)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    errors = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 14
    assert errors, "14 requests against 4 running + 4 waiting places were all admitted"
    assert outcomes.count("ok") >= 4  # the waiting places at least; the batch may not have taken any yet
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)
        assert status is not None
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "RESOURCE_EXHAUSTED without RetryInfo"
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert info.retry_delay.seconds > 0 or info.retry_delay.nanos > 0


def test_sigterm_stops_admission_and_lets_the_stream_finish(small_generator: GeneratorService) -> None:
    with grpc.insecure_channel(small_generator.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        stream = stub.GenerateStream(
            generation_pb2.GenerateStreamRequest(
                messages=STORY,
                parameters=common_pb2.SamplingParameters(max_new_tokens=40, temperature=0.8, seed=2),
            ),
            timeout=TIMEOUT,
        )
        first = next(stream)
        small_generator.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(
                generation_pb2.GenerateRequest(
                    prompt="Hi", parameters=common_pb2.SamplingParameters(max_new_tokens=4)
                ),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
    assert rest[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    text = first.token.text + "".join(r.token.text for r in rest)
    assert text == rest[-1].generated_text
    assert small_generator.process.process is not None
    assert small_generator.process.process.wait(timeout=30) == 0


REFUSED_OPTIONS = [
    (["--attn-implementation", "flash_attention_2"], ("flash_attention_2 needs a CUDA GPU", "sdpa")),
    (
        ["--backend", "onnx", "--quantization", "4bit"],
        ("--quantization 4bit is bitsandbytes", "--onnx-precision"),
    ),
    (["--backend", "onnx", "--device", "cuda"], ("runs on the CPU only", "--backend torch")),
]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("flags", "reasons"), REFUSED_OPTIONS, ids=lambda v: "-".join(v) if isinstance(v, list) else ""
)
def test_an_option_the_platform_lacks_stops_start_up_with_the_reason(
    flags: list[str], reasons: tuple[str, ...]
) -> None:
    process = ServiceProcess.python_module(
        "generator-refused",
        "services.generator",
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        *flags,
    ).start()
    assert process.process is not None
    code = process.process.wait(timeout=120)
    assert code == 2
    log = process.log_tail()
    assert all(reason in log for reason in reasons), log


def test_help_documents_flags_and_environment_variables() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.generator", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for text in ("--max-running-sequences", "GENERATOR_MAX_RUNNING_SEQUENCES", "--quantization", "--dtype"):
        assert text in result.stdout


def test_sigterm_while_the_model_loads_exits_at_once() -> None:
    seconds, code, log_tail = sigterm_while_loading("generator-loading", "services.generator")
    # Waiting for the load took 3 s from the cached copy (26 s from the GGUF) here.
    assert seconds < 2.0, log_tail
    assert code == 0, log_tail
