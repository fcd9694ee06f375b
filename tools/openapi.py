"""The OpenAPI 3.1 document of every REST route, generated from the descriptor set.

    python -m tools.openapi --descriptor build/inference.pb --output build/openapi.json

Every `google.api.http` annotation becomes an operation; schemas follow the proto3 JSON mapping as
Envoy's transcoder prints it (proto field names). tools/protos.py runs this beside the descriptor.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "build" / "inference.pb"
PACKAGE = "inference.v1"
OPENAPI_VERSION = "3.1.0"
SSE = "text/event-stream"
HTTP_BODY = "google.api.HttpBody"
STATUS = "google.rpc.Status"
OPENAI_ERROR = "OpenAIErrorResponse"
# Routes Envoy answers with 201 Created instead of 200 (its Lua filter's envoy_on_response), as
# Replicate answers a created prediction.
CREATED_ROUTES = frozenset({("post", "/v1/predictions")})
# Request headers a route reads besides the key, as OpenAPI header parameters.
HEADER_PARAMETERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("post", "/v1/predictions"): [
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": "`wait=N` (Replicate's header): hold the reply up to N seconds until the "
            "prediction ends (the service bounds N); without it the reply comes at once.",
            "schema": {"type": "string", "pattern": "^wait=[0-9]+$", "examples": ["wait=30"]},
        }
    ],
}
# The google.rpc details the services attach to a status (docs/architecture.md, Errors).
ERROR_DETAILS = (
    "google.rpc.BadRequest",
    "google.rpc.RetryInfo",
    "google.rpc.ErrorInfo",
    "google.rpc.ResourceInfo",
)
# How Envoy maps each status the services return to HTTP.
ERROR_STATUSES: dict[str, str] = {
    "400": "INVALID_ARGUMENT: a field is missing, malformed or out of range (BadRequest names the "
    "field and the limit).",
    "401": "UNAUTHENTICATED: no API key, or an unknown or revoked one.",
    "403": "PERMISSION_DENIED: the key lacks the scope this route needs.",
    "404": "NOT_FOUND: a model that no backend serves.",
    "429": "RESOURCE_EXHAUSTED: a rate limit, a token budget or a full generator queue (RetryInfo "
    "says when to retry).",
    "503": "UNAVAILABLE: no replica is serving, or the generator is shutting down.",
    "504": "DEADLINE_EXCEEDED: the client's deadline passed.",
}

_F = descriptor_pb2.FieldDescriptorProto
_INT64 = {_F.TYPE_INT64, _F.TYPE_SFIXED64, _F.TYPE_SINT64}
_UINT64 = {_F.TYPE_UINT64, _F.TYPE_FIXED64}
_SCALARS: dict[int, dict[str, Any]] = {
    _F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _F.TYPE_FLOAT: {"type": "number", "format": "float"},
    _F.TYPE_INT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _F.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    _F.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
# The proto3 JSON mapping of the well-known types: plain JSON, not objects with fields.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string", "description": "The type URL of the message."}},
        "required": ["@type"],
        "additionalProperties": True,
        "description": "A message of the type named in @type, its fields beside @type.",
    },
    "google.protobuf.DoubleValue": {"type": ["number", "null"]},
    "google.protobuf.FloatValue": {"type": ["number", "null"]},
    "google.protobuf.Int32Value": {"type": ["integer", "null"]},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"]},
    "google.protobuf.Int64Value": {"type": ["integer", "string", "null"]},
    "google.protobuf.UInt64Value": {"type": ["integer", "string", "null"]},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "format": "byte"},
}
_ENVOY_ROUTES: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("/healthz", "Envoy is up", "Answered by Envoy itself, without the gateway.", "text/plain", {}),
    (
        "/openapi.json",
        "This document",
        "Generated from the descriptor set with tools/openapi.py.",
        "application/json",
        {"type": "object"},
    ),
    ("/docs", "Swagger UI", "This document in Swagger UI, with requests to try.", "text/html", {}),
    ("/redoc", "ReDoc", "This document in ReDoc.", "text/html", {}),
]
_INFO_DESCRIPTION = """\
The REST side of the inference stack, served by Envoy, which transcodes each route to the gRPC \
method named in its operation id (package `{package}`).

- JSON names are the proto field names (snake_case); lowerCamel names are accepted on input.
- 64-bit integers are printed as strings and accepted as numbers or strings; enums are printed as \
their names.
- A field left out takes its default (a sampling knob: the server's); the schemas require none, \
the server checks what a request needs.
- Streams are server-sent events (`text/event-stream`). {stream_urls} stream on the same URL when \
the body has `"stream": true`.
- Errors: the native routes answer a `google.rpc.Status` as JSON (`code`, `message`, `details`); \
the OpenAI routes (`/v1/...`) answer OpenAI's error object.
- With API keys configured, send `Authorization: Bearer KEY` or `x-api-key: KEY`.
"""


@dataclass(frozen=True)
class Route:
    """One HTTP binding of an RPC."""

    method: str
    # The OpenAPI path: `{model=**}` becomes `{model}`.
    path: str
    body: str
    response_body: str
    # Path parameter name -> True when it may span several segments (`**`).
    params: dict[str, bool]


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    input: str
    output: str
    server_streaming: bool
    comment: str
    routes: list[Route] = field(default_factory=list)

    @property
    def operation_id(self) -> str:
        return f"{self.service}_{self.name}"


def _clean_comment(text: str) -> str:
    """A proto comment as Markdown: paragraphs joined into lines, buf directives dropped."""
    # googleapis cross-references ([Code][google.rpc.Code]) read as plain names.
    text = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"`\1`", text)
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("buf:lint:")]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def _first_sentence(text: str) -> str:
    first = text.split("\n\n", 1)[0]
    match = re.match(r"(.+?\.)(\s|$)", first)
    return (match.group(1) if match else first).rstrip(".")


class Descriptors:
    """The messages, enums, services and comments of a FileDescriptorSet, by full name."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet, package: str = PACKAGE) -> None:
        self.package = package
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        self.services: list[tuple[str, str, list[Rpc]]] = []
        for file in files.file:
            comments = {
                tuple(location.path): _clean_comment(location.leading_comments)
                for location in file.source_code_info.location
                if location.leading_comments.strip()
            }
            prefix = file.package
            for index, message in enumerate(file.message_type):
                self._add_message(prefix, message, (4, index), comments)
            for index, enum in enumerate(file.enum_type):
                self._add_enum(prefix, enum, (5, index), comments)
            if file.package != package:
                continue
            for s_index, service in enumerate(file.service):
                rpcs = [
                    Rpc(
                        service.name,
                        method.name,
                        method.input_type.lstrip("."),
                        method.output_type.lstrip("."),
                        method.server_streaming,
                        comments.get((6, s_index, 2, m_index), ""),
                        _routes(method.options.Extensions[annotations_pb2.http]),
                    )
                    for m_index, method in enumerate(service.method)
                ]
                self.services.append((service.name, comments.get((6, s_index), ""), rpcs))

    def _add_message(
        self,
        prefix: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        self.comments[name] = comments.get(path, "")
        for index, item in enumerate(message.field):
            self.comments[f"{name}.{item.name}"] = comments.get((*path, 2, index), "")
        for index, nested in enumerate(message.nested_type):
            self._add_message(name, nested, (*path, 3, index), comments)
        for index, enum in enumerate(message.enum_type):
            self._add_enum(name, enum, (*path, 4, index), comments)

    def _add_enum(
        self,
        prefix: str,
        enum: descriptor_pb2.EnumDescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{prefix}.{enum.name}"
        self.enums[name] = enum
        self.comments[name] = comments.get(path, "")
        for index, value in enumerate(enum.value):
            self.comments[f"{name}.{value.name}"] = comments.get((*path, 2, index), "")

    def rpcs(self) -> Iterator[Rpc]:
        for _, _, rpcs in self.services:
            yield from rpcs


def _routes(rule: http_pb2.HttpRule) -> list[Route]:
    routes = []
    for binding in [rule, *rule.additional_bindings]:
        pattern = binding.WhichOneof("pattern")
        if pattern is None:
            continue
        if pattern == "custom":
            method, template = binding.custom.kind.lower(), binding.custom.path
        else:
            method, template = pattern, getattr(binding, pattern)
        params: dict[str, bool] = {}

        def variable(match: re.Match[str], params: dict[str, bool] = params) -> str:
            params[match.group(1)] = "**" in (match.group(2) or "")
            return "{" + match.group(1) + "}"

        path = re.sub(r"\{([A-Za-z0-9_.]+)(?:=([^}]*))?\}", variable, template)
        routes.append(Route(method, path, binding.body, binding.response_body, params))
    return routes


class Generator:
    """Builds the document; schemas are added to components as operations reference them."""

    def __init__(self, descriptors: Descriptors) -> None:
        self.d = descriptors
        self.package = descriptors.package
        self.schemas: dict[str, dict[str, Any]] = {}
        # The URLs that stream with "stream": true, as operations find them.
        self.stream_urls: list[str] = []

    def schema_name(self, full_name: str) -> str:
        """The components/schemas key: short for the package's types, full for others."""
        return full_name.removeprefix(self.package + ".")

    def ref(self, full_name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{self.schema_name(full_name)}"}

    # -- schemas -----------------------------------------------------------------------------

    def type_schema(self, full_name: str) -> dict[str, Any]:
        """A reference to (or, for a well-known type, the inline schema of) a message or enum."""
        if full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[full_name])
        if full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        self._define(full_name)
        return self.ref(full_name)

    def _define(self, full_name: str) -> None:
        key = self.schema_name(full_name)
        if key in self.schemas:
            return
        if full_name in self.d.enums:
            self.schemas[key] = self._enum_schema(full_name)
            return
        self.schemas[key] = {}  # reserved first: messages may refer to themselves
        self.schemas[key] = self._message_schema(full_name)

    def _description(self, full_name: str) -> str:
        text = self.d.comments.get(full_name, "")
        # Other packages' comments (googleapis) run long: their first paragraph says enough.
        return text if full_name.startswith(self.package + ".") else text.split("\n\n", 1)[0]

    def _enum_schema(self, full_name: str) -> dict[str, Any]:
        enum = self.d.enums[full_name]
        names = [value.name for value in enum.value]
        values = "\n".join(
            f"- `{value.name}`: {self.d.comments[f'{full_name}.{value.name}']}"
            for value in enum.value
            if self.d.comments.get(f"{full_name}.{value.name}")
        )
        parts = [
            self._description(full_name),
            values,
            "Printed as the name; the number is accepted on input.",
        ]
        return {"type": "string", "enum": names, "description": "\n\n".join(part for part in parts if part)}

    def _message_schema(self, full_name: str) -> dict[str, Any]:
        message = self.d.messages[full_name]
        schema: dict[str, Any] = {"type": "object"}
        if description := self._description(full_name):
            schema["description"] = description
        properties: dict[str, Any] = {}
        real_oneofs = {
            index: [f.name for f in message.field if f.HasField("oneof_index") and f.oneof_index == index]
            for index, _ in enumerate(message.oneof_decl)
            if not any(
                f.proto3_optional
                for f in message.field
                if f.HasField("oneof_index") and f.oneof_index == index
            )
        }
        for item in message.field:
            prop = self.field_schema(item)
            notes = [self._description(f"{full_name}.{item.name}")]
            if item.type in _INT64 | _UINT64:
                notes.append("64-bit: printed as a string, accepted as a number or a string.")
            if item.HasField("oneof_index") and item.oneof_index in real_oneofs:
                others = [n for n in real_oneofs[item.oneof_index] if n != item.name]
                notes.append("Set at most one of this and " + ", ".join(f"`{n}`" for n in others) + ".")
            text = " ".join(note for note in notes if note)
            if text:
                prop = {**prop, "description": text}
            properties[item.name] = prop
        if properties:
            schema["properties"] = properties
        return schema

    def field_schema(self, item: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        type_name = item.type_name.lstrip(".")
        entry = self.d.messages.get(type_name)
        if item.label == _F.LABEL_REPEATED and entry is not None and entry.options.map_entry:
            value = next(f for f in entry.field if f.name == "value")
            return {"type": "object", "additionalProperties": self.field_schema(value)}
        if item.type in (_F.TYPE_MESSAGE, _F.TYPE_ENUM, _F.TYPE_GROUP):
            single = self.type_schema(type_name)
        elif item.type in _INT64 | _UINT64:
            single = {"type": ["integer", "string"], "format": "int64" if item.type in _INT64 else "uint64"}
        else:
            single = dict(_SCALARS[item.type])
        if item.label == _F.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single

    def _field(self, message: str, path: str) -> descriptor_pb2.FieldDescriptorProto | None:
        """The field at a dotted path (`a.b`) of a message."""
        current: descriptor_pb2.FieldDescriptorProto | None = None
        for part in path.split("."):
            fields = self.d.messages.get(message)
            current = next((f for f in fields.field if f.name == part), None) if fields else None
            if current is None:
                return None
            message = current.type_name.lstrip(".")
        return current

    # -- operations --------------------------------------------------------------------------

    def _query_parameters(self, message: str, skip: set[str], prefix: str = "") -> list[dict[str, Any]]:
        """The transcoder binds every field not in the path or the body to a query parameter."""
        params: list[dict[str, Any]] = []
        for item in self.d.messages[message].field:
            name = prefix + item.name
            if name in skip:
                continue
            type_name = item.type_name.lstrip(".")
            if item.type == _F.TYPE_MESSAGE:
                nested = self.d.messages.get(type_name)
                if nested is None or nested.options.map_entry or type_name.startswith("google.protobuf."):
                    continue
                if prefix.count(".") < 3:
                    params.extend(self._query_parameters(type_name, skip, name + "."))
                continue
            param: dict[str, Any] = {"name": name, "in": "query", "schema": self.field_schema(item)}
            if description := self._description(f"{message}.{item.name}"):
                param["description"] = description
            params.append(param)
        return params

    def _errors(self, path: str) -> dict[str, Any]:
        prefix = "OpenAIError" if path.startswith("/v1/") else "Error"
        return {code: {"$ref": f"#/components/responses/{prefix}{code}"} for code in ERROR_STATUSES}

    def _stream_events(self, rpc: Rpc, route: Route) -> tuple[dict[str, Any], str]:
        """The schema of one event of a streaming RPC, and what the events are."""
        openai = route.path.startswith("/v1/")
        if rpc.output != HTTP_BODY:
            return self.type_schema(rpc.output), (
                f"Server-sent events: each `data:` line is one `{self.schema_name(rpc.output)}` (the schema "
                "below) as JSON, one per message of the stream. A failure after the stream started "
                "arrives in band as the last event."
            )
        # The typed stream it frames: same service and request, and its name a prefix of this one
        # (StreamChatCompletion -> StreamChatCompletionEvents), or else the only such stream.
        typed_streams = [
            other
            for other in self.d.rpcs()
            if other.service == rpc.service
            and other.server_streaming
            and other.output != HTTP_BODY
            and other.input == rpc.input
        ]
        named = [other for other in typed_streams if rpc.name.startswith(other.name)]
        typed = named[0] if named else typed_streams[0] if len(typed_streams) == 1 else None
        if typed is None:
            return {}, "Server-sent events (`text/event-stream`) rendered by the gateway."
        name = self.schema_name(typed.output)
        text = f"Server-sent events: each `data:` line is one `{name}` (the schema below) as JSON"
        if openai:
            self._define_openai_error()
            text += (
                ", as OpenAI streams them; the last event is `data: [DONE]`. A failure after the "
                f"stream started arrives in band as an event holding an `{OPENAI_ERROR}`."
            )
        else:
            text += (
                "; the last message of each sequence carries its finish reason, and the stream ends "
                "with `data: [DONE]`. A failure after the stream started arrives in band as a last "
                "event whose `error` is set, with no `[DONE]` after it."
            )
        return self.type_schema(typed.output), text

    def _stream_sibling(self, rpc: Rpc, route: Route) -> tuple[Rpc, Route] | None:
        """The streaming RPC that Envoy routes a POST with `"stream": true` to (path `P:stream` or
        `P_stream`), when the request has a `stream` field."""
        if rpc.server_streaming or route.method != "post" or self._field(rpc.input, "stream") is None:
            return None
        for other in self.d.rpcs():
            if other.service != rpc.service or not other.server_streaming:
                continue
            for candidate in other.routes:
                if candidate.method == "post" and candidate.path in (
                    route.path + ":stream",
                    route.path + "_stream",
                ):
                    return other, candidate
        return None

    def _stream_callers(self, rpc: Rpc, route: Route) -> list[str]:
        callers = []
        for other in self.d.rpcs():
            for candidate in other.routes:
                sibling = self._stream_sibling(other, candidate)
                if sibling is not None and sibling[1] == route:
                    callers.append(candidate.path)
        return callers

    def operation(self, rpc: Rpc, route: Route, index: int) -> dict[str, Any]:
        description = rpc.comment
        summary = _first_sentence(description) if description else rpc.name
        op: dict[str, Any] = {
            "tags": [rpc.service],
            "summary": summary,
            "operationId": rpc.operation_id + (f"_{index}" if index else ""),
        }
        parameters: list[dict[str, Any]] = []
        for name, multi in route.params.items():
            item = self._field(rpc.input, name)
            text = self._description(f"{rpc.input}.{name}") if "." not in name else ""
            if multi:
                text = (text + " " if text else "") + "May span several path segments (`a/b`)."
            param: dict[str, Any] = {
                "name": name,
                "in": "path",
                "required": True,
                "schema": self.field_schema(item) if item is not None else {"type": "string"},
            }
            if text:
                param["description"] = text
            parameters.append(param)
        skip = set(route.params)
        if route.body == "*":
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": self.type_schema(rpc.input)}},
            }
        else:
            if route.body:
                skip.add(route.body)
                body_field = self._field(rpc.input, route.body)
                assert body_field is not None, f"{rpc.operation_id}: no field {route.body}"
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": self.field_schema(body_field)}},
                }
            parameters.extend(self._query_parameters(rpc.input, skip))
        parameters.extend(HEADER_PARAMETERS.get((route.method, route.path), []))
        if parameters:
            op["parameters"] = parameters

        notes: list[str] = []
        content: dict[str, Any]
        if rpc.server_streaming:
            schema, what = self._stream_events(rpc, route)
            content = {SSE: {"schema": schema}}
            ok = what
            for caller in self._stream_callers(rpc, route):
                notes.append(f'Also reached through `POST {caller}` with `"stream": true` in the body.')
        else:
            output = rpc.output
            if route.response_body:
                body_field = self._field(output, route.response_body)
                assert body_field is not None, f"{rpc.operation_id}: no field {route.response_body}"
                schema = self.field_schema(body_field)
            else:
                schema = self.type_schema(output)
            if output == HTTP_BODY:
                content = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
            else:
                content = {"application/json": {"schema": schema}}
            ok = "OK"
            sibling = self._stream_sibling(rpc, route)
            if sibling is not None:
                self.stream_urls.append(f"`POST {route.path}`")
                stream_rpc, stream_route = sibling
                stream_schema, what = self._stream_events(stream_rpc, stream_route)
                content[SSE] = {"schema": stream_schema}
                ok = f'`application/json`; with `"stream": true` in the body, `{SSE}`. {what}'
                notes.append(
                    f'With `"stream": true` in the body the same URL streams: Envoy sends the request to '
                    f"`POST {stream_route.path}` ({stream_rpc.name}) and the reply is server-sent events."
                )
        op["description"] = "\n\n".join(
            part
            for part in [description, *notes, f"gRPC: `{self.package}.{rpc.service}/{rpc.name}`."]
            if part
        )
        success = "201" if (route.method, route.path) in CREATED_ROUTES else "200"
        if success == "201":
            ok = "Created"
        op["responses"] = {success: {"description": ok, "content": content}, **self._errors(route.path)}
        order = ["tags", "summary", "description", "operationId", "parameters", "requestBody", "responses"]
        return {key: op[key] for key in order if key in op}

    def _define_openai_error(self) -> None:
        nullable = {"type": ["string", "null"]}
        self.schemas[OPENAI_ERROR] = {
            "type": "object",
            "description": "An error as OpenAI's API returns it.",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string", "description": "What was wrong, for a person."},
                        "type": {"type": "string", "description": 'e.g. "invalid_request_error".'},
                        "param": {**nullable, "description": "The request field at fault, if any."},
                        "code": {**nullable, "description": "A machine-readable code, if any."},
                    },
                    "required": ["message", "type"],
                }
            },
            "required": ["error"],
        }

    def _responses(self) -> dict[str, Any]:
        assert STATUS in self.d.messages, f"the descriptor set lacks {STATUS} (google/rpc/status.proto)"
        self._define(STATUS)
        for detail in ERROR_DETAILS:
            if detail in self.d.messages:
                self._define(detail)
        self._define_openai_error()
        responses: dict[str, Any] = {}
        for prefix, schema in (
            ("Error", self.ref(STATUS)),
            ("OpenAIError", {"$ref": f"#/components/schemas/{OPENAI_ERROR}"}),
        ):
            for code, text in ERROR_STATUSES.items():
                responses[f"{prefix}{code}"] = {
                    "description": text,
                    "content": {"application/json": {"schema": schema}},
                }
        return responses

    # -- the document ------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for rpc in self.d.rpcs():
            for index, route in enumerate(rpc.routes):
                paths.setdefault(route.path, {})[route.method] = self.operation(rpc, route, index)
        for path, summary, description, media, schema in _ENVOY_ROUTES:
            paths[path] = {
                "get": {
                    "tags": ["Envoy"],
                    "summary": summary,
                    "description": description,
                    "operationId": "Envoy_" + re.sub(r"\W", "_", path.strip("/")),
                    "security": [],
                    "responses": {"200": {"description": "OK", "content": {media: {"schema": schema}}}},
                }
            }
        responses = self._responses()
        status = self.schemas.get(self.schema_name(STATUS))
        if status and "details" in status.get("properties", {}):
            known = ", ".join(f"`{name}`" for name in ERROR_DETAILS if name in self.d.messages)
            status["properties"]["details"]["description"] = (
                f"google.rpc details, each with its type URL in `@type`: {known} (their schemas below)."
            )
        tags = [
            {"name": name, "description": comment} if comment else {"name": name}
            for name, comment, _ in self.d.services
        ]
        tags.append({"name": "Envoy", "description": "Envoy's own routes."})
        return {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "inference-stack REST API",
                "version": self.package.rsplit(".", 1)[-1],
                "description": _INFO_DESCRIPTION.format(
                    package=self.package, stream_urls=", ".join(self.stream_urls) or "No URLs"
                ),
                "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
            },
            "tags": tags,
            "security": [{}, {"bearer": []}, {"apiKey": []}],
            "paths": paths,
            "components": {
                "schemas": dict(sorted(self.schemas.items())),
                "responses": responses,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "`Authorization: Bearer KEY`.",
                    },
                    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                },
            },
        }


def build_document(files: descriptor_pb2.FileDescriptorSet, package: str = PACKAGE) -> dict[str, Any]:
    """The OpenAPI document of the package's services in a descriptor set (which should keep its
    source info: the comments become descriptions)."""
    return Generator(Descriptors(files, package)).document()


def render(descriptor: Path) -> str:
    """The document as the JSON text written to build/openapi.json and docs/openapi.json."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    return json.dumps(build_document(files), indent=2, ensure_ascii=False) + "\n"


def routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in a document."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the OpenAPI document of the REST routes.")
    parser.add_argument(
        "--descriptor", type=Path, default=DESCRIPTOR, help="the descriptor set (with source info)"
    )
    parser.add_argument("--output", type=Path, help="write here instead of standard output")
    args = parser.parse_args(argv)
    text = render(args.descriptor)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
