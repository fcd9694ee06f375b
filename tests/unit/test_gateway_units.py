"""The gateway's policy without a process: API keys and scopes, rate limits, request
validation, the response cache, backend targets and the OpenAI/SSE rendering."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from inference.v1 import common_pb2, embedding_pb2, generation_pb2, openai_pb2

from services.common import sampling, sse
from services.gateway import openai_compat as oai
from services.gateway import validation
from services.gateway.auth import (
    ApiKey,
    Authentication,
    KeyStore,
    current_key,
    digest,
    parse_keys,
    presented_key,
)
from services.gateway.backends import (
    ResponseCache,
    call_options,
    grpc_target,
    is_deterministic,
    service_config,
)
from services.gateway.errors import GatewayError, retry_delay
from services.gateway.ratelimit import RateLimiter, RateLimits

LIMITS = validation.RequestLimits()


def violations(error: GatewayError) -> dict[str, str]:
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    (detail,) = error.details
    assert isinstance(detail, error_details_pb2.BadRequest)
    return {item.field: item.description for item in detail.field_violations}


# --- API keys -------------------------------------------------------------------------------


def key_file(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


def test_keys_are_looked_up_by_hash_and_carry_scopes_and_limits(tmp_path: Path) -> None:
    path = key_file(
        tmp_path,
        [
            {
                "name": "a",
                "sha256": digest("secret-a"),
                "scopes": ["embed"],
                "requests_per_minute": 5,
                "burst": 2,
            }
        ],
    )
    store = KeyStore(str(path))
    assert not store.open
    entry = store.lookup("secret-a")
    assert entry is not None and entry.name == "a" and entry.scopes == {"embed"}
    assert entry.requests_per_minute == 5 and entry.burst == 2
    assert store.lookup("secret-b") is None
    assert "secret-a" not in path.read_text()


def test_a_key_store_without_keys_is_open() -> None:
    assert KeyStore().open


def test_a_revoked_key_is_picked_up_from_the_changed_file(tmp_path: Path) -> None:
    entry = {"name": "a", "sha256": digest("k"), "scopes": ["generate"]}
    path = key_file(tmp_path, [entry])
    store = KeyStore(str(path))
    found = store.lookup("k")
    assert found is not None and not found.revoked
    key_file(tmp_path, [{**entry, "revoked": True}])
    import os

    os.utime(path, (1e9, 1e9))
    store._checked = -10.0  # the next lookup re-reads the file instead of waiting a second
    found = store.lookup("k")
    assert found is not None and found.revoked


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a", "sha256": "short"}], "sha256"),
        ([{"name": "a", "sha256": "0" * 64, "scopes": ["root"]}], "unknown scopes"),
        ({"nokeys": 1}, "expected"),
    ],
)
def test_malformed_key_files_are_refused_with_the_reason(entries: object, message: str) -> None:
    text = json.dumps({"keys": entries} if isinstance(entries, list) else entries)
    with pytest.raises(ValueError, match=message):
        parse_keys(text, "keys.json")


def test_both_bearer_and_x_api_key_headers_are_accepted() -> None:
    assert presented_key([("authorization", "Bearer abc")]) == "abc"
    assert presented_key([("x-api-key", "xyz")]) == "xyz"
    assert presented_key([("authorization", "Basic abc")]) is None
    assert presented_key([("cookie", "k=abc")]) is None


class _Metadata:
    """The one thing `Authentication` reads from a grpc.aio servicer context."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


async def authenticate(store: KeyStore, method: str, *metadata: tuple[str, str]) -> str:
    """The name of the key `Authentication` lets through to the method's behaviour."""

    async def behavior(request: object, context: object) -> str:
        return current_key.get().name

    wrapped = Authentication(store).unary(method, behavior)
    name: str = await asyncio.wait_for(wrapped(None, cast(Any, _Metadata(*metadata))), 5)
    return name


def scoped_store(tmp_path: Path) -> KeyStore:
    return KeyStore(
        str(
            key_file(
                tmp_path,
                [
                    {"name": "gen", "sha256": digest("g"), "scopes": ["generate"]},
                    {"name": "old", "sha256": digest("o"), "scopes": ["generate"], "revoked": True},
                ],
            )
        )
    )


GENERATE = "/inference.v1.GenerationService/Generate"
EMBED = "/inference.v1.EmbeddingService/Embed"


async def test_a_key_reaches_only_the_methods_of_its_scopes(tmp_path: Path) -> None:
    store = scoped_store(tmp_path)
    assert await authenticate(store, GENERATE, ("authorization", "Bearer g")) == "gen"
    with pytest.raises(GatewayError) as denied:
        await authenticate(store, EMBED, ("x-api-key", "g"))
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED and "'embed' scope" in denied.value.message
    # Listing models needs a valid key but no scope; the health check needs no key at all.
    assert await authenticate(store, "/inference.v1.OpenAIService/ListModels", ("x-api-key", "g")) == "gen"
    assert await authenticate(store, "/grpc.health.v1.Health/Check") == "anonymous"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "missing API key"),
        ((("authorization", "Bearer nope"),), "invalid API key"),
        ((("authorization", "Bearer o"),), "revoked"),
    ],
)
async def test_missing_unknown_and_revoked_keys_are_unauthenticated(
    tmp_path: Path, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    with pytest.raises(GatewayError) as refused:
        await authenticate(scoped_store(tmp_path), GENERATE, *metadata)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and reason in refused.value.message


async def test_an_open_gateway_lets_every_call_through_as_anonymous() -> None:
    assert await authenticate(KeyStore(), EMBED) == "anonymous"


# --- rate limits ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_beyond_the_limit_is_refused_with_a_retry_hint_and_passes_later() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(0, 0, 0), clock)
    key = ApiKey("k", "", frozenset({"generate"}), requests_per_minute=60, burst=3)
    for _ in range(3):
        limiter.admit(key)
    with pytest.raises(GatewayError) as refused:
        limiter.admit(key)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    delay = retry_delay(refused.value)
    assert delay is not None and 0.9 <= delay <= 1.01
    clock.now += delay
    limiter.admit(key)


def test_token_budget_is_charged_from_reported_usage() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(0, 0, 0), clock)
    key = ApiKey("k", "", frozenset({"generate"}), tokens_per_minute=600)
    limiter.admit(key)
    limiter.charge(key, 700)
    with pytest.raises(GatewayError) as refused:
        limiter.admit(key)
    assert "tokens per minute" in refused.value.message
    delay = retry_delay(refused.value)
    assert delay is not None and 10 < delay <= 11.1  # 101 tokens at 10 per second
    clock.now += delay
    limiter.admit(key)


def test_keys_without_limits_use_the_defaults_and_zero_means_unlimited() -> None:
    limiter = RateLimiter(RateLimits(0, 0, 0), Clock())
    key = ApiKey("k", "", frozenset())
    for _ in range(1000):
        limiter.admit(key)
    strict = RateLimiter(RateLimits(1, 0, 1), Clock())
    strict.admit(key)
    with pytest.raises(GatewayError):
        strict.admit(key)


# --- validation -----------------------------------------------------------------------------


def test_generate_requests_name_every_bad_field_and_its_limit() -> None:
    request = generation_pb2.GenerateRequest(
        prompt="",
        parameters=common_pb2.SamplingParameters(
            max_new_tokens=0, temperature=-1, top_p=1.5, num_return_sequences=99
        ),
    )
    request.parameters.stop.list_value.values.add(string_value="")
    with pytest.raises(GatewayError) as bad:
        validation.validate_generate(request, LIMITS)
    fields = violations(bad.value)
    assert set(fields) == {
        "prompt",
        "parameters.max_new_tokens",
        "parameters.temperature",
        "parameters.top_p",
        "parameters.num_return_sequences",
        "parameters.stop[0]",
    }
    assert "4096" in fields["parameters.max_new_tokens"]
    assert "8" in fields["parameters.num_return_sequences"]


def test_prompt_and_messages_are_exclusive_and_roles_are_checked() -> None:
    request = generation_pb2.GenerateRequest(
        prompt="x", messages=[common_pb2.ChatMessage(role="wizard", content="hi")]
    )
    with pytest.raises(GatewayError) as bad:
        validation.validate_generate(request, LIMITS)
    assert set(violations(bad.value)) == {"prompt", "messages[0].role"}


def test_oversize_prompts_are_refused_with_the_limit() -> None:
    request = generation_pb2.GenerateRequest(prompt="x" * 11)
    with pytest.raises(GatewayError) as bad:
        validation.validate_generate(request, validation.RequestLimits(max_prompt_chars=10))
    assert "limit of 10" in violations(bad.value)["prompt"]


def test_a_good_generate_request_passes() -> None:
    request = generation_pb2.GenerateRequest(
        prompt="hi",
        parameters=common_pb2.SamplingParameters(max_new_tokens=5, temperature=0.7, top_k=5, seed=3),
    )
    request.parameters.stop.string_value = "\n"
    validation.validate_generate(request, LIMITS)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ([], "input"),
        ([""], "input[0]"),
        ([1.5, 2.0], "input[0]"),
        ([["a"]], "input[0]"),
        ({"a": 1}, "input"),
    ],
)
def test_bad_embedding_inputs_are_named(value: object, field: str) -> None:
    request = embedding_pb2.EmbedRequest()
    request.input.CopyFrom(_value(value))
    with pytest.raises(GatewayError) as bad:
        validation.validate_embed(request, LIMITS)
    assert field in violations(bad.value)


def _value(data: object) -> struct_pb2.Value:
    value = struct_pb2.Value()
    holder = struct_pb2.Struct()
    holder.update({"v": cast(Any, data)})
    value.CopyFrom(holder.fields["v"])
    return value


def test_openai_chat_accepts_text_parts_and_maps_developer_to_system() -> None:
    request = openai_pb2.CreateChatCompletionRequest(model="m")
    first = request.messages.add(role="developer")
    first.content.string_value = "be brief"
    second = request.messages.add(role="user")
    second.content.CopyFrom(_value([{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]))
    plan = validation.validate_chat_completion(request, LIMITS)
    assert plan.turns == (("system", "be brief"), ("user", "hello"))


def test_openai_chat_refuses_image_parts_unknown_roles_and_a_missing_model() -> None:
    request = openai_pb2.CreateChatCompletionRequest(temperature=3)
    first = request.messages.add(role="robot")
    first.content.string_value = "x"
    second = request.messages.add(role="user")
    second.content.CopyFrom(_value([{"type": "image_url", "image_url": {"url": "x"}}]))
    with pytest.raises(GatewayError) as bad:
        validation.validate_chat_completion(request, LIMITS)
    assert set(violations(bad.value)) == {
        "model",
        "temperature",
        "messages[0].role",
        "messages[1].content[0]",
    }


def test_openai_temperature_is_checked_once_against_openais_range() -> None:
    request = openai_pb2.CreateChatCompletionRequest(model="m", temperature=-1)
    request.messages.add(role="user").content.string_value = "x"
    with pytest.raises(GatewayError) as bad:
        validation.validate_chat_completion(request, LIMITS)
    (detail,) = bad.value.details
    assert isinstance(detail, error_details_pb2.BadRequest)
    problems = [v.description for v in detail.field_violations if v.field == "temperature"]
    assert len(problems) == 1 and "2]" in problems[0], problems


def test_a_completion_without_max_tokens_is_not_refused_for_the_default_it_gets() -> None:
    """OpenAI's default of 16 tokens is the server's choice, even where the limit is lower."""
    request = openai_pb2.CreateCompletionRequest(model="m")
    request.prompt.string_value = "x"
    assert validation.validate_completion(request, validation.RequestLimits(max_new_tokens=8)) == ["x"]


def test_completion_prompts_as_token_ids_are_refused_with_a_reason() -> None:
    request = openai_pb2.CreateCompletionRequest(model="m")
    request.prompt.CopyFrom(_value([1.0, 2.0]))
    with pytest.raises(GatewayError) as bad:
        validation.validate_completion(request, LIMITS)
    assert "token-id" in violations(bad.value)["prompt"]


# --- cache, determinism, routing --------------------------------------------------------------


def test_only_greedy_or_seeded_requests_are_deterministic() -> None:
    assert is_deterministic(generation_pb2.GenerateRequest(prompt="x"))
    assert is_deterministic(
        generation_pb2.GenerateRequest(
            prompt="x", parameters=common_pb2.SamplingParameters(do_sample=False, temperature=0.9)
        )
    )
    assert is_deterministic(
        generation_pb2.GenerateRequest(
            prompt="x", parameters=common_pb2.SamplingParameters(do_sample=True, seed=1)
        )
    )
    assert not is_deterministic(
        generation_pb2.GenerateRequest(prompt="x", parameters=common_pb2.SamplingParameters(do_sample=True))
    )
    assert not is_deterministic(
        generation_pb2.GenerateRequest(prompt="x", parameters=common_pb2.SamplingParameters(temperature=0.7))
    )
    assert not is_deterministic(
        generation_pb2.GenerateRequest(prompt="x", parameters=common_pb2.SamplingParameters(top_k=5))
    )


def test_the_response_cache_is_a_bounded_lru_that_counts_hits() -> None:
    cache = ResponseCache(2)
    requests = [generation_pb2.GenerateRequest(prompt=str(n)) for n in range(3)]
    for number, request in enumerate(requests):
        cache.put("Generate", request, generation_pb2.GenerateResponse(generated_text=str(number)))
    assert len(cache) == 2
    assert cache.get("Generate", requests[0], generation_pb2.GenerateResponse) is None
    hit = cache.get("Generate", requests[2], generation_pb2.GenerateResponse)
    assert hit is not None and hit.generated_text == "2"
    assert cache.get("Chat", requests[2], generation_pb2.GenerateResponse) is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_backend_targets_for_lists_names_and_single_addresses() -> None:
    assert grpc_target("127.0.0.1:1,127.0.0.1:2") == (
        "ipv4:127.0.0.1:1,127.0.0.1:2",
        ["127.0.0.1:1", "127.0.0.1:2"],
    )
    assert grpc_target("localhost:5,127.0.0.1:6")[0] == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert grpc_target("dns:///generator:50052") == ("dns:///generator:50052", ["dns:///generator:50052"])
    assert grpc_target("127.0.0.1:50052") == ("127.0.0.1:50052", ["127.0.0.1:50052"])


def test_service_config_balances_round_robin_checks_health_and_retries_unary_calls_only() -> None:
    config = json.loads(service_config(3))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    (method,) = config["methodConfig"]
    names = {(item["service"], item["method"]) for item in method["name"]}
    assert ("inference.v1.GenerationService", "Generate") in names
    assert ("inference.v1.GenerationService", "GenerateStream") not in names
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


# --- OpenAI shapes and SSE ------------------------------------------------------------------


def stream_message(
    index: int,
    text: str,
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    usage: bool = False,
) -> generation_pb2.GenerateStreamResponse:
    message = generation_pb2.GenerateStreamResponse(
        request_id="r1", index=index, token=common_pb2.Token(text=text), finish_reason=finish
    )
    if usage:
        message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    return message


def test_chat_chunks_start_with_the_role_end_with_a_reason_and_usage() -> None:
    chunker = oai.ChatChunker("m", include_usage=True)
    chunks = [
        *chunker.feed(stream_message(0, "Hi")),
        *chunker.feed(stream_message(0, "", common_pb2.FINISH_REASON_LENGTH, usage=True)),
        *chunker.finish(),
    ]
    bodies = [oai.chat_chunk_json(chunk) for chunk in chunks]
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert bodies[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert bodies[1]["choices"][0]["finish_reason"] is None
    assert bodies[2]["choices"][0]["finish_reason"] == "length"
    assert bodies[3]["choices"] == [] and bodies[3]["usage"]["total_tokens"] == 5
    assert all(body["id"] == "chatcmpl-r1" and body["object"] == "chat.completion.chunk" for body in bodies)


def test_sse_events_are_data_lines_and_errors_are_in_band() -> None:
    assert sse.sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse.DONE_EVENT == b"data: [DONE]\n\n"
    error = json.loads(oai.sse_error("boom", "server_error", 503, "UNAVAILABLE")[len(b"data: ") :])
    assert error["error"]["message"] == "boom" and error["error"]["code"] == 503


def test_embeddings_render_as_floats_or_base64_little_endian() -> None:
    import base64
    import struct

    response = embedding_pb2.EmbedResponse(
        data=[embedding_pb2.Embedding(index=0, embedding_bytes=struct.pack("<2f", 0.5, -1.0))], model="e"
    )
    as_base64 = oai.embedding_response(response, "base64", "e")
    assert base64.b64decode(as_base64.data[0].embedding.string_value) == struct.pack("<2f", 0.5, -1.0)
    as_floats = oai.embedding_response(response, "float", "e")
    assert [v.number_value for v in as_floats.data[0].embedding.list_value.values] == [0.5, -1.0]


def test_openai_temperature_zero_is_greedy_and_sampling_is_the_default() -> None:
    greedy = oai.sampling_parameters(openai_pb2.CreateChatCompletionRequest(temperature=0))
    assert sampling.is_greedy(greedy)
    default = oai.sampling_parameters(openai_pb2.CreateChatCompletionRequest(n=2, seed=4, max_tokens=7))
    assert default == common_pb2.SamplingParameters(
        do_sample=True, num_return_sequences=2, seed=4, max_new_tokens=7
    )
    assert not sampling.is_greedy(default)
    completion = oai.sampling_parameters(openai_pb2.CreateCompletionRequest())
    assert completion.max_new_tokens == oai.COMPLETION_DEFAULT_MAX_TOKENS


def test_openai_violations_use_openai_field_names() -> None:
    request = openai_pb2.CreateChatCompletionRequest(model="m", n=99, max_tokens=5, max_completion_tokens=0)
    request.messages.add(role="user").content.string_value = "hi"
    request.stop.list_value.values.add(string_value="")
    with pytest.raises(GatewayError) as bad:
        validation.validate_chat_completion(request, LIMITS)
    assert set(violations(bad.value)) == {"n", "max_completion_tokens", "stop[0]"}


class _CallContext:
    """The two things `call_options` reads from a grpc.aio servicer context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float:
        return 4.5


def test_only_safe_metadata_reaches_the_backends() -> None:
    incoming = (
        ("authorization", "Bearer secret"),
        ("x-api-key", "secret"),
        ("cookie", "session=1"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-envoy-original-path", "/generate"),
        ("x-request-id", "abc"),
        ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
    )
    context = cast(Any, _CallContext(incoming))
    timeout, forwarded = call_options(context, tracing=False)
    assert timeout == 4.5
    assert dict(forwarded) == {"x-request-id": "abc", "traceparent": incoming[-1][1]}
    # With tracing on, the tracing interceptor writes traceparent itself (the gateway's span).
    assert dict(call_options(context, tracing=True)[1]) == {"x-request-id": "abc"}
