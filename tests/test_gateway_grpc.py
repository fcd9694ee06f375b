"""The gateway's gRPC face (no Envoy): typed OpenAI streams, deadlines passed on, errors with
google.rpc details, aggregated health, and grpc.health.v1 per service."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from inference.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    openai_pb2,
    openai_pb2_grpc,
)

from tests.fixtures_gateway import GatewayService


@pytest.fixture(scope="module")
def channel(gateway_service: GatewayService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway_service.address) as opened:
        yield opened


def generation_model(channel: grpc.Channel, gateway_service: GatewayService) -> str:
    reply = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
        info_pb2.ListServedModelsRequest(), timeout=30, metadata=gateway_service.metadata()
    )
    return next(model.id for model in reply.models if model.task == "generation")


def test_typed_chat_stream_for_grpc_clients(channel: grpc.Channel, gateway_service: GatewayService) -> None:
    request = openai_pb2.CreateChatCompletionRequest(
        model=generation_model(channel, gateway_service), max_tokens=4, temperature=0
    )
    message = request.messages.add(role="user")
    message.content.string_value = "Say hello."
    request.stream_options.include_usage = True
    chunks = list(
        openai_pb2_grpc.OpenAIServiceStub(channel).StreamChatCompletion(
            request, timeout=120, metadata=gateway_service.metadata()
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] in ("stop", "length")
    assert chunks[-1].HasField("usage") and chunks[-1].usage.completion_tokens <= 4


def test_bad_input_is_invalid_argument_with_bad_request_details(
    channel: grpc.Channel, gateway_service: GatewayService
) -> None:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(
            generation_pb2.GenerateRequest(
                prompt="x", parameters=common_pb2.SamplingParameters(temperature=-2, top_k=-1)
            ),
            timeout=30,
            metadata=gateway_service.metadata(),
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(failed.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert {item.field for item in bad.field_violations} == {"parameters.temperature", "parameters.top_k"}


def test_the_clients_deadline_reaches_the_backend(
    channel: grpc.Channel, gateway_service: GatewayService
) -> None:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    story = common_pb2.ChatMessage(role="user", content="Write a very long story about a dragon.")
    request = generation_pb2.GenerateRequest(
        messages=[story], parameters=common_pb2.SamplingParameters(max_new_tokens=300, do_sample=False)
    )
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(request, timeout=0.5, metadata=gateway_service.metadata())
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value


def test_health_aggregates_the_backends(channel: grpc.Channel) -> None:
    reply = info_pb2_grpc.InfoServiceStub(channel).GetHealth(info_pb2.GetHealthRequest(), timeout=30)
    assert reply.status == info_pb2.SERVING_STATUS_SERVING
    assert reply.components[0].component == "gateway"
    assert {"generator", "embedder"} <= {component.component for component in reply.components}


@pytest.mark.parametrize(
    "service",
    ["", "inference.v1.GenerationService", "inference.v1.OpenAIService", "inference.v1.InfoService"],
)
def test_grpc_health_serves_every_service(channel: grpc.Channel, service: str) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
