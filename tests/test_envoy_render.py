"""Envoy's config renderer: the rendered file uses the given ports and Envoy itself accepts it
(this starts `envoy --mode validate`, so it stays out of the fast tier). A real Envoy routes
PredictionService's REST routes (after the transcoder rewrites them) and gRPC methods to the
predictions cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2  # type: ignore[import-untyped]
from inference.v1 import predictions_pb2, predictions_pb2_grpc

from tests.fixtures_gateway import descriptor_for_envoy, render_envoy, start_envoy
from tests.stack import ROOT, free_port


def test_rendered_envoy_config_uses_the_given_ports_and_envoy_accepts_it(tmp_path: Path) -> None:
    text = render_envoy(18080, 19901, "127.0.0.1:15051", ROOT / "build" / "inference.pb")
    assert "port_value: 18080" in text and "port_value: 19901" in text and "port_value: 15051" in text
    assert "8080}" not in text.replace("18080}", "")
    envoy = shutil.which("envoy")
    assert envoy, "envoy is missing"
    (tmp_path / "envoy.yaml").write_text(text)
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--base-id", "93"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_envoy_admin_port_listens_on_loopback_only() -> None:
    text = render_envoy(1, 2, "gateway:50051", Path("/x.pb"))
    assert "socket_address: {address: 127.0.0.1, port_value: 2}" in text
    assert 'address: "gateway", port_value: 50051' in text


def test_the_predictions_address_is_rendered() -> None:
    assert 'address: "127.0.0.1", port_value: 50054' in render_envoy(1, 2, "gateway:50051", Path("/x.pb"))
    text = render_envoy(1, 2, "gateway:50051", Path("/x.pb"), predictions_address="predictions:6000")
    assert 'address: "predictions", port_value: 6000' in text
    with pytest.raises(ValueError, match="predictions_address"):
        render_envoy(1, 2, "gateway:50051", Path("/x.pb"), predictions_address="predictions")


class _RecordingPredictions(predictions_pb2_grpc.PredictionServiceServicer):
    """A stand-in upstream for the predictions cluster: it answers from the request and the
    metadata Envoy forwarded, so the test sees what crossed the edge (the service itself is
    tested end to end elsewhere)."""

    def CreatePrediction(
        self, request: predictions_pb2.CreatePredictionRequest, context: grpc.ServicerContext
    ) -> predictions_pb2.Prediction:
        if request.model == "refused":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input.prompt: is required")
        metadata = dict(context.invocation_metadata())
        reply = predictions_pb2.Prediction(id="p1", model=request.model, status="starting")
        reply.input.CopyFrom(request.input)
        reply.logs = json.dumps({key: metadata.get(key, "") for key in ("prefer", "authorization")})
        return reply

    def GetPrediction(
        self, request: predictions_pb2.GetPredictionRequest, context: grpc.ServicerContext
    ) -> predictions_pb2.Prediction:
        context.abort(grpc.StatusCode.NOT_FOUND, f"prediction {request.id} not found")
        raise AssertionError("abort raises")

    def ListPredictions(
        self, request: predictions_pb2.ListPredictionsRequest, context: grpc.ServicerContext
    ) -> predictions_pb2.ListPredictionsResponse:
        return predictions_pb2.ListPredictionsResponse(
            next=f"{request.cursor}|{request.status}|{request.page_size}"
        )

    def CancelPrediction(
        self, request: predictions_pb2.CancelPredictionRequest, context: grpc.ServicerContext
    ) -> predictions_pb2.Prediction:
        return predictions_pb2.Prediction(id=request.id, status="canceled")

    def UpdateDeployment(
        self, request: predictions_pb2.UpdateDeploymentRequest, context: grpc.ServicerContext
    ) -> predictions_pb2.Deployment:
        return predictions_pb2.Deployment(
            name=request.name, model=request.model, description=request.description
        )

    def DeleteDeployment(
        self, request: predictions_pb2.DeleteDeploymentRequest, context: grpc.ServicerContext
    ) -> predictions_pb2.DeleteDeploymentResponse:
        return predictions_pb2.DeleteDeploymentResponse()

    def StreamPredictionEvents(
        self, request: predictions_pb2.StreamPredictionRequest, context: grpc.ServicerContext
    ) -> Iterator[httpbody_pb2.HttpBody]:
        for index in range(3):
            yield httpbody_pb2.HttpBody(content_type="text/event-stream", data=f"data: {index}\n\n".encode())


@pytest.fixture(scope="module")
def predictions_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Envoy in front of the stand-in predictions upstream (the gateway cluster points nowhere)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # Only the methods the tests call; the others answer UNIMPLEMENTED.
    servicer = _RecordingPredictions()  # type: ignore[abstract]
    predictions_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    envoy = start_envoy(
        f"127.0.0.1:{free_port()}",
        tmp_path_factory.mktemp("envoy-predictions"),
        name="envoy-predictions",
        descriptor=descriptor_for_envoy(),
        cors_origins="*",
        predictions_address=f"127.0.0.1:{port}",
    )
    yield envoy.url
    envoy.process.stop()
    server.stop(0)


def _call(
    url: str, method: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read(), reply.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def test_a_created_prediction_is_a_201_with_the_callers_headers_passed_on(predictions_edge: str) -> None:
    status, body, _ = _call(
        f"{predictions_edge}/v1/predictions",
        "POST",
        {"model": "m", "input": {"prompt": "hi"}},
        {"prefer": "wait=5", "authorization": "Bearer k"},
    )
    assert status == 201, body
    reply = json.loads(body)
    assert reply["id"] == "p1" and reply["input"] == {"prompt": "hi"}
    assert json.loads(reply["logs"]) == {"prefer": "wait=5", "authorization": "Bearer k"}
    # Only a created prediction: other successes keep their 200.
    status, body, _ = _call(f"{predictions_edge}/v1/predictions/p1/cancel", "POST")
    assert status == 200 and json.loads(body)["status"] == "canceled"


def test_prediction_errors_have_the_v1_shape(predictions_edge: str) -> None:
    status, body, _ = _call(f"{predictions_edge}/v1/predictions", "POST", {"model": "refused", "input": {}})
    assert status == 400
    assert json.loads(body)["error"]["param"] == "input.prompt"
    status, body, _ = _call(f"{predictions_edge}/v1/predictions", "POST", {"model": "m", "inputs": {}})
    assert status == 400 and json.loads(body)["error"]["param"] == "inputs"
    status, body, _ = _call(f"{predictions_edge}/v1/predictions/nope", "GET")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


def test_list_query_parameters_and_patch_bodies_pass_the_edge(predictions_edge: str) -> None:
    status, body, _ = _call(f"{predictions_edge}/v1/predictions?cursor=c1&status=failed&page_size=5", "GET")
    assert status == 200 and json.loads(body)["next"] == "c1|failed|5"
    status, body, _ = _call(f"{predictions_edge}/v1/predictions?colour=red", "GET")
    assert status == 400
    status, body, _ = _call(
        f"{predictions_edge}/v1/deployments/d1", "PATCH", {"model": "m2", "description": "x"}
    )
    assert status == 200 and json.loads(body) == {
        "name": "d1",
        "model": "m2",
        "task": "",
        "version": "",
        "description": "x",
    }
    status, body, _ = _call(f"{predictions_edge}/v1/deployments/d1", "PATCH", {"modle": "m2"})
    assert status == 400 and json.loads(body)["error"]["param"] == "modle"
    status, body, _ = _call(f"{predictions_edge}/v1/deployments/d1", "DELETE")
    assert status == 200


def test_the_stream_route_and_native_grpc_reach_the_predictions_service(predictions_edge: str) -> None:
    status, body, _ = _call(f"{predictions_edge}/v1/predictions/p1/stream", "GET")
    assert status == 200 and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    with grpc.insecure_channel(predictions_edge.removeprefix("http://")) as channel:
        stub = predictions_pb2_grpc.PredictionServiceStub(channel)
        reply = stub.CancelPrediction(predictions_pb2.CancelPredictionRequest(id="q"), timeout=10)
    assert reply.status == "canceled"


def test_cors_preflights_allow_patch_and_delete(predictions_edge: str) -> None:
    status, _, headers = _call(
        f"{predictions_edge}/v1/deployments/d1",
        "OPTIONS",
        headers={"origin": "http://a.example", "access-control-request-method": "PATCH"},
    )
    assert status == 200
    assert {"PATCH", "DELETE"} <= {m.strip() for m in headers["access-control-allow-methods"].split(",")}
