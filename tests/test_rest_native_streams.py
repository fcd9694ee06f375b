"""Streaming on every native route through the real stack (Envoy, gateway, generator): REST
`"stream": true` on /generate, /chat and /solve/* (and /generate_stream) gives token events, a
final event with finish reason and usage, then `data: [DONE]`; the typed gRPC streams through the
gateway; seed-style aliases (max_tokens, stop_sequences); a dropped stream frees its batch slot."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx2
import pytest
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc
from inference_client import AsyncInferenceClient, InferenceClient

from tests.fixtures_gateway import GatewayService, start_envoy, start_gateway
from tests.fixtures_generator import GeneratorService, start_generator

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"max_new_tokens": 8, "do_sample": False}
# (REST route, body without "stream", the unary reply's field holding the whole text)
ROUTES: list[tuple[str, dict[str, Any], str]] = [
    ("/generate", {"messages": QUESTION, "parameters": GREEDY}, "generated_text"),
    ("/chat", {"messages": QUESTION, "parameters": GREEDY}, "message.content"),
    ("/solve/math", {"problem": "What is 12 * 7?", "parameters": GREEDY}, "solution"),
    ("/solve/coding", {"problem": "Reverse a string.", "parameters": GREEDY}, "solution"),
]


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("user"), timeout=120) as client:
        yield client


def read_stream(reply: httpx2.Response) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON events of an SSE reply and every `data:` payload as sent (to see [DONE])."""
    assert reply.status_code == 200, reply.read().decode()
    assert reply.headers["content-type"].startswith("text/event-stream"), reply.headers
    raw = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    return [json.loads(item) for item in raw if item != "[DONE]"], raw


def field(body: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        body = body[part]
    return body


def check_native_stream(events: list[dict[str, Any]], raw: list[str]) -> dict[str, Any]:
    """Token events, then a final event with finish reason and usage, then [DONE]; returns the
    final event."""
    assert raw[-1] == "[DONE]" and raw.count("[DONE]") == 1, raw[-3:]
    assert len(events) >= 2
    assert all("token" in event and "error" not in event for event in events)
    assert all(event["request_id"] == events[0]["request_id"] for event in events)
    assert all(event["finish_reason"] == "FINISH_REASON_UNSPECIFIED" for event in events[:-1])
    final = events[-1]
    assert final["finish_reason"].startswith("FINISH_REASON_") and final["finish_reason"] != (
        "FINISH_REASON_UNSPECIFIED"
    )
    assert final["usage"]["completion_tokens"] == final["tokens_generated"] == len(events)
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["tokens_generated"]
    assert final["generation_time"] > 0
    assert "".join(event["token"]["text"] for event in events) == final["generated_text"]
    return final


@pytest.mark.parametrize(("route", "body", "text_field"), ROUTES, ids=[r[0] for r in ROUTES])
def test_stream_true_streams_sse_ending_in_done_with_the_unary_text(
    rest: httpx2.Client, route: str, body: dict[str, Any], text_field: str
) -> None:
    unary = rest.post(route, json=body)
    assert unary.status_code == 200, unary.text
    with rest.stream("POST", route, json={**body, "stream": True}) as reply:
        events, raw = read_stream(reply)
    final = check_native_stream(events, raw)
    assert final["generated_text"] == field(unary.json(), text_field)
    if route == "/solve/math":
        assert final["answer"] == unary.json()["answer"]
    elif route == "/solve/coding":
        assert final["code"] == unary.json()["code"] and final["language"] == "python"
    else:
        assert "answer" not in final and "code" not in final


def test_generate_stream_route_ends_the_same_way(rest: httpx2.Client) -> None:
    body = {"messages": QUESTION, "parameters": GREEDY}
    with rest.stream("POST", "/generate_stream", json=body) as reply:
        events, raw = read_stream(reply)
    final = check_native_stream(events, raw)
    # The events print like the transcoder's typed stream did: every primitive, enums by name.
    assert {"request_id", "index", "token", "generated_text", "tokens_per_second"} <= set(events[0])
    assert events[0]["generated_text"] == "" and events[0]["index"] == 0
    assert set(events[0]["token"]) >= {"id", "text", "logprob", "special"}
    assert rest.post("/generate", json=body).json()["generated_text"] == final["generated_text"]


def test_a_bad_streamed_request_is_an_http_400_not_a_stream(rest: httpx2.Client) -> None:
    for route, body in (("/chat", {"messages": []}), ("/solve/coding", {"problem": " "})):
        with rest.stream("POST", route, json={**body, "stream": True}) as reply:
            text = reply.read().decode()
        assert reply.status_code == 400, text
        assert "[DONE]" not in text and json.loads(text)["message"]


# --- the names seed-style clients send ------------------------------------------------------


def test_seed_style_aliases_work_on_generate(rest: httpx2.Client) -> None:
    prompt = {"messages": QUESTION}
    canonical = rest.post("/generate", json={**prompt, "parameters": {"max_new_tokens": 12}}).json()
    assert "Paris" in canonical["generated_text"], canonical
    seed = rest.post("/generate", json={**prompt, "parameters": {"max_tokens": 12}})
    assert seed.status_code == 200, seed.text
    assert seed.json()["generated_text"] == canonical["generated_text"]
    assert seed.json()["tokens_generated"] == canonical["tokens_generated"]

    stopped = rest.post(
        "/generate", json={**prompt, "parameters": {"max_tokens": 12, "stop_sequences": ["Paris"]}}
    )
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["finish_reason"] == "FINISH_REASON_STOP_SEQUENCE"
    assert "Paris" not in stopped.json()["generated_text"]

    same = {"max_tokens": 12, "max_new_tokens": 12, "stop": "Paris", "stop_sequences": ["Paris"]}
    both = rest.post("/generate", json={**prompt, "parameters": same})
    assert both.status_code == 200, both.text
    assert both.json()["generated_text"] == stopped.json()["generated_text"]

    with rest.stream(
        "POST", "/generate", json={**prompt, "stream": True, "parameters": {"max_tokens": 3}}
    ) as reply:
        events, raw = read_stream(reply)
    assert check_native_stream(events, raw)["tokens_generated"] <= 3


@pytest.mark.parametrize("stream", [False, True])
def test_conflicting_aliases_are_a_400_naming_both_fields(rest: httpx2.Client, stream: bool) -> None:
    body = {"prompt": "Hello", "stream": stream, "parameters": {"max_tokens": 3, "max_new_tokens": 4}}
    reply = rest.post("/generate", json=body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["message"]
    assert "parameters.max_tokens" in message and "parameters.max_new_tokens" in message
    stops = {"prompt": "Hello", "parameters": {"stop": ["a"], "stop_sequences": ["b"]}}
    reply = rest.post("/generate", json=stops)
    assert reply.status_code == 400 and "parameters.stop_sequences" in reply.json()["message"]


# --- typed gRPC streams through the gateway -------------------------------------------------


def test_typed_streams_through_the_gateway(gateway_service: GatewayService) -> None:
    key = gateway_service.keys["user"]
    with InferenceClient(gateway_service.address, api_key=key, timeout=120) as client:
        chat = client.chat([("user", "What is the capital of France?")], max_new_tokens=8)
        stream = client.chat_stream([("user", "What is the capital of France?")], max_new_tokens=8)
        assert "".join(token.text for token in stream) == chat.message.content
        assert stream.done and stream.usage is not None
        assert stream.usage.completion_tokens == chat.tokens_generated

        math = client.solve_math_stream("What is 2 + 3?", max_new_tokens=24)
        text = "".join(token.text for token in math)
        summary = math.summaries[0]
        assert summary.text == text and summary.answer is not None and summary.code is None

        coding = client.solve_coding_stream("Add two numbers.", language="python", max_new_tokens=24)
        text = "".join(token.text for token in coding)
        summary = coding.summaries[0]
        assert summary.text == text and summary.code is not None and summary.language == "python"


async def test_async_typed_solve_math_stream_matches_the_sync_one(gateway_service: GatewayService) -> None:
    key = gateway_service.keys["user"]
    async with AsyncInferenceClient(gateway_service.address, api_key=key, timeout=120) as client:
        stream = client.solve_math_stream("What is 2 + 3?", max_new_tokens=24)
        pieces = [token.text async for token in stream]
    with InferenceClient(gateway_service.address, api_key=key, timeout=120) as client:
        again = client.solve_math_stream("What is 2 + 3?", max_new_tokens=24)
        assert "".join(token.text for token in again) == "".join(pieces)
        assert again.summaries[0].answer is not None
        assert again.summaries[0].answer == stream.summaries[0].answer


# --- a client that leaves frees the generator's batch slot ----------------------------------


def running(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    return int(reply.components[0].requests_running)


def wait_running(address: str, expected: int, limit_s: float) -> int:
    deadline = time.monotonic() + limit_s
    now = running(address)
    while now != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        now = running(address)
    return now


STORY = "Write a long story about a dragon."


def test_a_dropped_rest_chat_stream_frees_the_batch_slot(rest: httpx2.Client, generator_address: str) -> None:
    # Greedy, the story runs past 3,000 tokens: it is still running when the client leaves.
    body = {
        "messages": [{"role": "user", "content": STORY}],
        "stream": True,
        "parameters": {"max_new_tokens": 3000, "do_sample": False},
    }
    with rest.stream("POST", "/chat", json=body) as reply:
        assert reply.status_code == 200
        for count, _ in enumerate(line for line in reply.iter_lines() if line.startswith("data: ")):
            if count == 2:
                assert wait_running(generator_address, 1, 10) == 1
                break
    assert wait_running(generator_address, 0, 5) == 0


def test_a_cancelled_grpc_solve_stream_frees_the_batch_slot(
    gateway_service: GatewayService, generator_address: str
) -> None:
    key = gateway_service.keys["user"]
    with InferenceClient(gateway_service.address, api_key=key, timeout=120) as client:
        with client.solve_coding_stream(STORY, max_new_tokens=3000, do_sample=False) as stream:
            for count, _ in enumerate(stream):
                if count == 2:
                    assert wait_running(generator_address, 1, 10) == 1
                    break
            assert not stream.done
        assert wait_running(generator_address, 0, 5) == 0


# --- the generator serves the same RPCs -----------------------------------------------------


def test_the_generator_serves_the_streams_and_their_sse(
    generator_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    parameters = common_pb2.SamplingParameters(max_tokens=16)
    request = generation_pb2.SolveMathRequest(problem="What is 3 + 4?", parameters=parameters)
    unary = generator_stub.SolveMath(request, timeout=120)
    messages = list(generator_stub.SolveMathStream(request, timeout=120))
    assert "".join(message.token.text for message in messages) == unary.solution
    assert messages[-1].HasField("answer") and messages[-1].answer == unary.answer
    assert messages[-1].usage.completion_tokens == unary.tokens_generated <= 16

    chat = generation_pb2.ChatRequest(
        messages=[common_pb2.ChatMessage(role="user", content="Hi")], parameters=parameters
    )
    data = b"".join(body.data for body in generator_stub.ChatStreamEvents(chat, timeout=120)).decode()
    payloads = [line.removeprefix("data: ") for line in data.split("\n\n") if line]
    assert payloads[-1] == "[DONE]"
    final = json.loads(payloads[-2])
    assert final["finish_reason"] != "FINISH_REASON_UNSPECIFIED" and final["usage"]["total_tokens"] > 0


def test_the_generator_refuses_conflicting_aliases_too(
    generator_stub: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    parameters = common_pb2.SamplingParameters(max_tokens=2, max_new_tokens=3)
    with pytest.raises(grpc.RpcError) as caught:
        generator_stub.Generate(
            generation_pb2.GenerateRequest(prompt="Hi", parameters=parameters), timeout=60
        )
    error = caught.value
    assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.max_tokens" in (error.details() or "")
    assert "parameters.max_new_tokens" in (error.details() or "")


# --- a failure after the first event --------------------------------------------------------


@pytest.fixture(scope="module")
def doomed_stack(
    embedder_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, GeneratorService]]:
    """Envoy and a gateway in front of a generator of their own, which a test may kill."""
    generator = start_generator()
    process, address, _ = start_gateway(
        generator.address,
        embedder_address,
        ("--tracing", "false", "--metrics-port", "0"),
        name="gateway-doomed",
    )
    envoy = start_envoy(address, tmp_path_factory.mktemp("envoy-doomed"), name="envoy-doomed")
    yield envoy.url, generator
    envoy.process.stop()
    process.stop()
    generator.stop()


def test_a_native_stream_whose_backend_dies_ends_with_an_error_event(
    doomed_stack: tuple[str, GeneratorService],
) -> None:
    url, generator = doomed_stack
    body = {"problem": STORY, "stream": True, "parameters": {"max_new_tokens": 3000, "do_sample": False}}
    with httpx2.stream("POST", f"{url}/solve/coding", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        payloads = []
        for line in reply.iter_lines():
            if line.startswith("data: "):
                payloads.append(line.removeprefix("data: "))
                if len(payloads) == 2:
                    generator.process.send_signal(signal.SIGKILL)
    assert len(payloads) >= 3 and "[DONE]" not in payloads
    last = json.loads(payloads[-1])
    # A killed backend reads as UNAVAILABLE (a reset connection); the point is: not a clean end.
    assert last["error"]["code"] != grpc.StatusCode.OK.value[0] and last["error"]["message"]
    assert all("error" not in json.loads(payload) for payload in payloads[:-1])
