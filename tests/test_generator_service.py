"""The generator end to end: the real default model in its own process, over loopback gRPC."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from inference.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

from tests.fixtures_generator import GeneratorService

TIMEOUT = 120.0
FRANCE = [common_pb2.ChatMessage(role="user", content="What is the capital of France?")]
STORY = [common_pb2.ChatMessage(role="user", content="Write a very long story about a dragon and a knight.")]


@pytest.fixture(scope="module")
def channel(generator_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(generator_address) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(channel)


def stream_texts(
    stub: generation_pb2_grpc.GenerationServiceStub, request: generation_pb2.GenerateStreamRequest
) -> tuple[dict[int, str], list[generation_pb2.GenerateStreamResponse]]:
    replies = list(stub.GenerateStream(request, timeout=TIMEOUT))
    texts: dict[int, str] = {}
    for reply in replies:
        texts[reply.index] = texts.get(reply.index, "") + reply.token.text
    return texts, replies


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def metric_value(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not exported"
    return float(match.group(1))


def test_greedy_chat_answers_the_capital_of_france(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    reply = stub.Chat(
        generation_pb2.ChatRequest(
            messages=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=24)
        ),
        timeout=TIMEOUT,
    )
    assert reply.message.role == "assistant"
    assert reply.message.content == "The capital of France is Paris."
    assert reply.finish_reason == common_pb2.FINISH_REASON_EOS_TOKEN
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens == reply.tokens_generated > 0


def test_generate_with_messages_uses_the_chat_template(
    stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    reply = stub.Generate(
        generation_pb2.GenerateRequest(
            messages=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=24)
        ),
        timeout=TIMEOUT,
    )
    assert "Paris" in reply.generated_text
    assert reply.model == "SmolLM2-135M-Instruct"
    assert [s.text for s in reply.sequences] == [reply.generated_text]
    assert reply.tokens_per_second > 0


def test_streamed_tokens_concatenate_to_the_unary_text(
    stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    unary = stub.Generate(
        generation_pb2.GenerateRequest(
            prompt="The three most famous rivers in Europe are",
            parameters=common_pb2.SamplingParameters(max_new_tokens=40),
        ),
        timeout=TIMEOUT,
    )
    texts, replies = stream_texts(
        stub,
        generation_pb2.GenerateStreamRequest(
            prompt="The three most famous rivers in Europe are",
            parameters=common_pb2.SamplingParameters(max_new_tokens=40),
        ),
    )
    assert texts[0] == unary.generated_text
    assert len(replies) == unary.tokens_generated
    last = replies[-1]
    assert last.generated_text == unary.generated_text
    assert last.finish_reason == unary.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert last.usage.completion_tokens == unary.tokens_generated
    assert all(not r.HasField("usage") for r in replies[:-1])


def test_stop_sequence_spanning_tokens_ends_the_text_before_it(
    stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    stop = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="of Fr")]))
    reply = stub.Generate(
        generation_pb2.GenerateRequest(
            messages=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=24, stop=stop)
        ),
        timeout=TIMEOUT,
    )
    assert reply.generated_text == "The capital "
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    texts, replies = stream_texts(
        stub,
        generation_pb2.GenerateStreamRequest(
            messages=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=24, stop=stop)
        ),
    )
    assert texts[0] == "The capital "
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE


def test_num_return_sequences_returns_that_many_sequences(
    stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    request = generation_pb2.GenerateRequest(
        messages=STORY,
        parameters=common_pb2.SamplingParameters(
            max_new_tokens=16, num_return_sequences=3, temperature=1.0, top_p=0.95, seed=7
        ),
    )
    reply = stub.Generate(request, timeout=TIMEOUT)
    assert [s.index for s in reply.sequences] == [0, 1, 2]
    assert all(s.text and s.tokens_generated > 0 for s in reply.sequences)
    assert len({s.text for s in reply.sequences}) > 1
    assert reply.usage.completion_tokens == sum(s.tokens_generated for s in reply.sequences)
    texts, _ = stream_texts(
        stub,
        generation_pb2.GenerateStreamRequest(
            messages=STORY,
            parameters=common_pb2.SamplingParameters(
                max_new_tokens=16, num_return_sequences=3, temperature=1.0, top_p=0.95, seed=7
            ),
        ),
    )
    assert texts == {s.index: s.text for s in reply.sequences}


def test_beam_search_returns_the_best_beams(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    check_beam_search_returns_the_best_beams(stub)


def check_beam_search_returns_the_best_beams(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    reply = stub.Generate(
        generation_pb2.GenerateRequest(
            messages=FRANCE,
            parameters=common_pb2.SamplingParameters(max_new_tokens=20, num_beams=3, num_return_sequences=2),
        ),
        timeout=TIMEOUT,
    )
    assert len(reply.sequences) == 2
    assert "Paris" in reply.sequences[0].text
    assert reply.sequences[0].text != reply.sequences[1].text


def test_cjk_and_emoji_prompts_never_yield_replacement_characters(
    stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    for prompt in (
        "请写一首关于月亮的中文诗。",
        "Reply only with emoji: 🌙🚀🎉 are my favourites, and yours are",
    ):
        texts, replies = stream_texts(
            stub,
            generation_pb2.GenerateStreamRequest(
                prompt=prompt,
                parameters=common_pb2.SamplingParameters(
                    max_new_tokens=48, temperature=0.9, seed=3, repetition_penalty=1.1
                ),
            ),
        )
        assert all("\ufffd" not in r.token.text for r in replies)
        assert "\ufffd" not in texts[0]
        assert texts[0] == replies[-1].generated_text


def check_a_cancelled_stream_leaves_the_running_batch(
    stub: generation_pb2_grpc.GenerationServiceStub, service: GeneratorService
) -> None:
    call = stub.GenerateStream(
        generation_pb2.GenerateStreamRequest(
            messages=STORY,
            parameters=common_pb2.SamplingParameters(max_new_tokens=1500, temperature=0.8, seed=1),
        ),
        timeout=TIMEOUT,
    )
    for received, _ in enumerate(call, start=1):
        if received == 3:
            break
    assert metric_value(service.metrics_port, "generator_running_sequences") >= 1
    call.cancel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric_value(service.metrics_port, "generator_running_sequences") == 0:
            break
        time.sleep(0.1)
    assert metric_value(service.metrics_port, "generator_running_sequences") == 0
    info = info_pb2_grpc.InfoServiceStub(grpc.insecure_channel(service.address))
    stats = info.GetStats(info_pb2.GetStatsRequest(), timeout=10).components[0]
    assert stats.requests_running == 0


def test_a_cancelled_stream_leaves_the_running_batch(
    stub: generation_pb2_grpc.GenerationServiceStub, generator_service: GeneratorService
) -> None:
    check_a_cancelled_stream_leaves_the_running_batch(stub, generator_service)


INVALID_KNOBS: list[tuple[str, dict[str, Any]]] = [
    ("parameters.max_new_tokens", {"parameters": common_pb2.SamplingParameters(max_new_tokens=0)}),
    ("parameters.max_new_tokens", {"parameters": common_pb2.SamplingParameters(max_new_tokens=100000)}),
    ("parameters.temperature", {"parameters": common_pb2.SamplingParameters(temperature=-0.5)}),
    ("parameters.top_p", {"parameters": common_pb2.SamplingParameters(top_p=1.5)}),
    ("parameters.top_p", {"parameters": common_pb2.SamplingParameters(top_p=0.0)}),
    ("parameters.top_k", {"parameters": common_pb2.SamplingParameters(top_k=-1)}),
    ("parameters.repetition_penalty", {"parameters": common_pb2.SamplingParameters(repetition_penalty=0.0)}),
    (
        "parameters.num_return_sequences",
        {"parameters": common_pb2.SamplingParameters(num_return_sequences=0)},
    ),
    (
        "parameters.num_return_sequences",
        {"parameters": common_pb2.SamplingParameters(num_return_sequences=1000)},
    ),
    ("parameters.num_beams", {"parameters": common_pb2.SamplingParameters(num_beams=0)}),
    ("parameters.num_beams", {"parameters": common_pb2.SamplingParameters(num_beams=99)}),
    (
        "parameters.num_return_sequences",
        {"parameters": common_pb2.SamplingParameters(num_beams=2, num_return_sequences=3)},
    ),
    ("parameters.stop", {"parameters": common_pb2.SamplingParameters(stop=struct_pb2.Value(number_value=3))}),
    (
        "parameters.stop[0]",
        {"parameters": common_pb2.SamplingParameters(stop=struct_pb2.Value(string_value="x" * 1000))},
    ),
    ("prompt", {"prompt": ""}),
    ("prompt", {"messages": FRANCE}),
    ("messages[0].role", {"prompt": "", "messages": [common_pb2.ChatMessage(role="robot", content="hi")]}),
]


@pytest.mark.parametrize(
    ("field", "knobs"), INVALID_KNOBS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID_KNOBS)]
)
def test_each_invalid_knob_gives_invalid_argument_naming_it(
    stub: generation_pb2_grpc.GenerationServiceStub, field: str, knobs: dict[str, Any]
) -> None:
    request = generation_pb2.GenerateRequest(**{"prompt": "Hello", **knobs})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=TIMEOUT)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(error)
    assert field in error.details()
    stream_request = generation_pb2.GenerateStreamRequest(**{"prompt": "Hello", **knobs})
    with pytest.raises(grpc.RpcError) as caught_stream:
        list(stub.GenerateStream(stream_request, timeout=TIMEOUT))
    assert caught_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prompt_longer_than_the_context_is_invalid(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(
            generation_pb2.GenerateRequest(
                prompt="hello " * 8200, parameters=common_pb2.SamplingParameters(max_new_tokens=10)
            ),
            timeout=TIMEOUT,
        )
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in error.details()


def test_unknown_model_is_not_found(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(generation_pb2.GenerateRequest(prompt="Hi", model="gpt-17"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_math_and_coding_extract_answer_and_code(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    math = stub.SolveMath(
        generation_pb2.SolveMathRequest(
            problem="What is 12 * 7?", parameters=common_pb2.SamplingParameters(max_new_tokens=96)
        ),
        timeout=TIMEOUT,
    )
    assert math.solution
    assert math.answer and math.answer in math.solution
    coding = stub.SolveCoding(
        generation_pb2.SolveCodingRequest(
            problem="Write a function that adds two numbers.",
            parameters=common_pb2.SamplingParameters(max_new_tokens=128),
        ),
        timeout=TIMEOUT,
    )
    assert coding.language == "python"
    assert coding.code and coding.code in coding.solution
    assert "```" not in coding.code


def test_info_service_reports_this_process(channel: grpc.Channel) -> None:
    info = info_pb2_grpc.InfoServiceStub(channel)
    health = info.GetHealth(info_pb2.GetHealthRequest(), timeout=10)
    assert health.status == info_pb2.SERVING_STATUS_SERVING
    component = health.components[0]
    assert component.component == "generator"
    assert component.device.type in ("cpu", "cuda")
    assert component.memory.process_rss_mib > 0 and component.memory.system_total_mib > 0
    assert component.models == ["SmolLM2-135M-Instruct"]
    models = info.ListServedModels(info_pb2.ListServedModelsRequest(), timeout=10).models
    assert models[0].task == "generation" and models[0].loaded
    assert models[0].max_sequence_length == 8192
    assert models[0].source.endswith(".gguf")
    assert models[0].dtype in ("float32", "bfloat16", "float16")  # named alike by either runtime
    # requests_total counts the generation calls received (the warm-up is not one of them).
    generation_pb2_grpc.GenerationServiceStub(channel).Generate(
        generation_pb2.GenerateRequest(
            prompt="Hi", parameters=common_pb2.SamplingParameters(max_new_tokens=1)
        ),
        timeout=TIMEOUT,
    )
    stats = info.GetStats(info_pb2.GetStatsRequest(), timeout=10).components[0]
    assert stats.requests_total > 0 and stats.generated_tokens_total > 0


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"inference.v1.GenerationService", "inference.v1.InfoService", "grpc.health.v1.Health"} <= names


def test_metrics_cover_latency_tokens_and_batches(generator_service: GeneratorService) -> None:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{generator_service.metrics_port}/metrics", timeout=10
    ) as reply:
        text = reply.read().decode()
    for name in (
        "generator_requests_total",
        "generator_time_to_first_token_seconds_bucket",
        "generator_inter_token_latency_seconds_bucket",
        "generator_e2e_latency_seconds_bucket",
        "generator_queue_time_seconds_bucket",
        "generator_prompt_tokens_total",
        "generator_generated_tokens_total",
        "generator_running_sequences",
        "generator_waiting_requests",
        "generator_batch_size_bucket",
    ):
        assert name in text, name


def test_concurrent_greedy_requests_match_the_answer_alone(
    stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    alone = stub.Chat(
        generation_pb2.ChatRequest(
            messages=FRANCE, parameters=common_pb2.SamplingParameters(max_new_tokens=24)
        ),
        timeout=TIMEOUT,
    )

    def chat(i: int) -> str:
        messages = FRANCE if i % 2 == 0 else STORY
        reply = stub.Chat(
            generation_pb2.ChatRequest(
                messages=messages, parameters=common_pb2.SamplingParameters(max_new_tokens=24)
            ),
            timeout=TIMEOUT,
        )
        return str(reply.message.content)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(chat, range(8)))
    assert all(answer == alone.message.content for answer in answers[0::2])
