"""Records <-> protobuf for the predictions API, and the prediction JSON (the API's own JSON for a
prediction, as Envoy's transcoder prints it) that webhooks carry."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from inference.v1 import predictions_pb2

from services.predictions.records import Deployment, Prediction

METRIC_FIELDS = (
    "predict_time",
    "total_time",
    "input_token_count",
    "output_token_count",
    "time_to_first_token",
)
_COUNTS = frozenset({"input_token_count", "output_token_count"})
# Doubles carry integers exactly up to here; larger integral numbers stay floats.
_EXACT = 2**53


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    # Naive datetimes come back from SQLite; the store writes UTC.
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp


def plain_json(value: Any) -> Any:
    """`value` (from a Struct or Value) with integral numbers as ints: JSON over REST does not keep
    16 apart from 16.0, and schemas and request protos want integers where integers are meant."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < _EXACT:
        return int(value)
    if isinstance(value, dict):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_json(item) for item in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return dict(plain_json(json_format.MessageToDict(struct)))


def dict_to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def to_value(data: Any) -> struct_pb2.Value:
    """Any JSON value as a Value; None is null_value (printed as `null`, never left out)."""
    value = struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    else:
        json_format.ParseDict(data, value)
    return value


def urls(prediction_id: str, public_url: str) -> predictions_pb2.PredictionUrls:
    base = f"{public_url.rstrip('/')}/v1/predictions/{prediction_id}"
    return predictions_pb2.PredictionUrls(get=base, cancel=f"{base}/cancel", stream=f"{base}/stream")


def metrics(prediction: Prediction) -> predictions_pb2.PredictionMetrics:
    values: dict[str, Any] = {}
    for name in METRIC_FIELDS:
        if name in prediction.metrics:
            number = prediction.metrics[name]
            values[name] = max(0, int(number)) if name in _COUNTS else float(number)
    if "total_time" not in values and prediction.completed_at is not None:
        values["total_time"] = max(0.0, (prediction.completed_at - prediction.created_at).total_seconds())
    return predictions_pb2.PredictionMetrics(**values)


def prediction_to_proto(prediction: Prediction, public_url: str) -> predictions_pb2.Prediction:
    """The API's view of a prediction: no credentials, lease or attempt; urls from `public_url`."""
    message = predictions_pb2.Prediction(
        id=prediction.id,
        model=prediction.model,
        version=prediction.version,
        status=prediction.status,
        input=dict_to_struct(prediction.input),
        output=to_value(prediction.output),
        error=prediction.error,
        logs=prediction.logs,
        created_at=timestamp(prediction.created_at),
        metrics=metrics(prediction),
        urls=urls(prediction.id, public_url),
        webhook=prediction.webhook,
        webhook_events_filter=list(prediction.webhook_events_filter),
        task=prediction.task,
    )
    if prediction.started_at is not None:
        message.started_at.CopyFrom(timestamp(prediction.started_at))
    if prediction.completed_at is not None:
        message.completed_at.CopyFrom(timestamp(prediction.completed_at))
    return message


def message_dict(message: Message) -> dict[str, Any]:
    """A message as Envoy's transcoder prints it: proto field names in field order, fields
    without presence always, integral numbers without a fraction (as protobuf's C++ printer)."""
    printed = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    ordered = {f.name: printed[f.name] for f in message.DESCRIPTOR.fields if f.name in printed}
    return dict(plain_json(ordered))


def message_json(message: Message) -> str:
    return json.dumps(message_dict(message), ensure_ascii=False, separators=(",", ":"))


def prediction_json(prediction: Prediction, public_url: str) -> str:
    """The prediction's JSON as GET /v1/predictions/{id} returns it: the webhook body."""
    return message_json(prediction_to_proto(prediction, public_url))


def deployment_to_proto(deployment: Deployment) -> predictions_pb2.Deployment:
    message = predictions_pb2.Deployment(
        name=deployment.name,
        model=deployment.model,
        task=deployment.task,
        version=deployment.version,
        defaults=dict_to_struct(deployment.defaults),
        description=deployment.description,
    )
    if deployment.input_schema is not None:
        message.input_schema.CopyFrom(dict_to_struct(deployment.input_schema))
    if deployment.created_at is not None:
        message.created_at.CopyFrom(timestamp(deployment.created_at))
    if deployment.updated_at is not None:
        message.updated_at.CopyFrom(timestamp(deployment.updated_at))
    return message
