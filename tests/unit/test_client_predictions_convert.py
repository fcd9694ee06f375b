"""The predictions client's conversions: page cursors from the server's links, Struct numbers as
REST's JSON gives them, `Prefer: wait` as metadata, and which methods the channel retries."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2
from inference.v1 import predictions_pb2
from inference_client import _convert
from inference_client._channel import RetryPolicy


def test_cursors_come_from_the_links_query() -> None:
    assert _convert.cursor_of("") is None
    assert _convert.cursor_of("http://h:8080/v1/predictions?cursor=a%2Bb&page_size=2") == "a+b"
    assert _convert.cursor_of("/v1/predictions?page_size=2") is None
    # A bare cursor is taken as it is.
    assert _convert.cursor_of("opaque") == "opaque" and _convert.cursor_of("b64==") == "b64=="


def test_a_prediction_reads_like_its_rest_json() -> None:
    reply = predictions_pb2.Prediction(id="p", status="succeeded", task="embed")
    reply.input.update({"input": ["a"], "dimensions": 3})
    reply.output.struct_value.update({"embeddings": [[0.5, 1.0]], "usage": {"prompt_tokens": 2}})
    reply.created_at.FromSeconds(10)
    reply.completed_at.FromSeconds(12)
    reply.metrics.predict_time = 1.5
    prediction = _convert.prediction(reply)
    assert prediction.input == {"input": ["a"], "dimensions": 3}
    assert prediction.output == {"embeddings": [[0.5, 1]], "usage": {"prompt_tokens": 2}}
    assert isinstance(prediction.input["dimensions"], int)
    assert prediction.done and prediction.started_at is None
    assert prediction.completed_at is not None and prediction.created_at.timestamp() == 10
    assert prediction.metrics.predict_time == 1.5
    empty = _convert.prediction(predictions_pb2.Prediction(id="q", status="starting"))
    assert empty.output is None and not empty.done
    null = predictions_pb2.Prediction(id="r", status="starting")
    null.output.null_value = struct_pb2.NULL_VALUE
    assert _convert.prediction(null).output is None


def test_update_sets_only_the_fields_given() -> None:
    request = _convert.update_deployment_request("d", None, None, "v2", None, None, "")
    assert request.HasField("version") and request.HasField("description")
    assert not request.HasField("model") and not request.HasField("defaults")


def test_wait_is_whole_seconds_of_prefer() -> None:
    assert _convert.wait_metadata(None) == ()
    assert _convert.wait_metadata(5.4) == (("prefer", "wait=5"),)
    assert _convert.wait_metadata(0.1) == (("prefer", "wait=1"),)


def test_only_prediction_reads_and_cancels_are_retried() -> None:
    config = json.loads(RetryPolicy().service_config())
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    service = "inference.v1.PredictionService"
    assert (service, "GetPrediction") in names and (service, "CancelPrediction") in names
    for method in ("CreatePrediction", "CreateDeployment", "UpdateDeployment", "DeleteDeployment"):
        assert (service, method) not in names
    assert (service, "StreamPrediction") not in names
