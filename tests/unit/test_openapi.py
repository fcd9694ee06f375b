"""tools/openapi.py on descriptors built in this process (no protoc): the contract's generated
modules, and a small proto written here for the mappings the contract does not use yet."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor, descriptor_pb2, text_format
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from inference.v1 import embedding_pb2, generation_pb2, info_pb2, openai_pb2
from openapi_spec_validator import validate

from tools.envoy_config import render_config
from tools.openapi import build_document, routes


def descriptor_set(*files: descriptor.FileDescriptor) -> descriptor_pb2.FileDescriptorSet:
    """The files with their imports, dependencies first (as protoc --include_imports writes them)."""
    result = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        result.file.append(proto)

    for file in files:
        add(file)
    return result


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    files = (generation_pb2, embedding_pb2, info_pb2, openai_pb2, error_details_pb2)
    return build_document(descriptor_set(*(module.DESCRIPTOR for module in files)))


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(value) for value in node))
    return set()


def resolve(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_the_contract_document_validates_and_every_reference_resolves(contract: dict[str, Any]) -> None:
    validate(contract)
    for pointer in refs(contract):
        assert resolve(contract, pointer), pointer
    assert contract["openapi"] == "3.1.0"


def test_every_annotated_rpc_is_an_operation_named_after_it(contract: dict[str, Any]) -> None:
    operations = {op["operationId"] for item in contract["paths"].values() for op in item.values()}
    for module in (generation_pb2, embedding_pb2, info_pb2, openai_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                annotated = method.GetOptions().ListFields()
                assert (f"{service.name}_{method.name}" in operations) == bool(annotated), method.full_name
    assert ("GET", "/v1/models/{model}") in routes(contract)
    assert ("GET", "/embeddings/counter/{model}") in routes(contract)


def test_a_multi_segment_template_is_a_required_path_parameter(contract: dict[str, Any]) -> None:
    (param,) = contract["paths"]["/v1/models/{model}"]["get"]["parameters"]
    assert param["in"] == "path" and param["required"] and param["name"] == "model"
    # (The generated modules carry no comments: the field's own description is not here.)
    assert param["description"] == "May span several path segments (`a/b`)."


@pytest.mark.parametrize(
    ("path", "event"),
    [
        ("/generate", "GenerateStreamResponse"),
        ("/v1/chat/completions", "StreamChatCompletionResponse"),
        ("/v1/completions", "StreamCompletionResponse"),
    ],
)
def test_a_url_that_streams_with_stream_true_documents_both_replies(
    contract: dict[str, Any], path: str, event: str
) -> None:
    operation = contract["paths"][path]["post"]
    content = operation["responses"]["200"]["content"]
    assert content["text/event-stream"]["schema"] == {"$ref": f"#/components/schemas/{event}"}
    assert "application/json" in content
    assert '"stream": true' in operation["description"]


def test_openai_routes_document_openai_errors_and_native_routes_a_status(contract: dict[str, Any]) -> None:
    for path, item in contract["paths"].items():
        for operation in item.values():
            if operation["tags"] == ["Envoy"]:
                continue
            expected = "OpenAIError" if path.startswith("/v1/") else "Error"
            assert operation["responses"]["400"] == {"$ref": f"#/components/responses/{expected}400"}, path
    status = contract["components"]["schemas"]["google.rpc.Status"]["properties"]
    assert set(status) == {"code", "message", "details"}
    error = contract["components"]["schemas"]["OpenAIErrorResponse"]["properties"]["error"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_openai_sse_ends_with_done(contract: dict[str, Any]) -> None:
    reply = contract["paths"]["/v1/chat/completions:stream"]["post"]["responses"]["200"]
    assert "data: [DONE]" in reply["description"]
    assert reply["content"]["text/event-stream"]["schema"]["$ref"].endswith("/StreamChatCompletionResponse")


def test_fields_follow_the_proto3_json_mapping(contract: dict[str, Any]) -> None:
    schemas = contract["components"]["schemas"]
    request = schemas["CreateChatCompletionRequest"]["properties"]
    assert request["seed"]["type"] == ["integer", "string"]  # int64
    assert request["max_tokens"] == {"type": "integer", "format": "int32"}
    assert request["messages"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/ChatCompletionMessage"},
    }
    assert "type" not in request["stop"]  # google.protobuf.Value: any JSON
    assert schemas["FinishReason"]["type"] == "string"
    assert "FINISH_REASON_LENGTH" in schemas["FinishReason"]["enum"]
    assert schemas["Embedding"]["properties"]["embedding_bytes"]["format"] == "byte"
    assert "required" not in schemas["GenerateRequest"]  # proto3: nothing is required


SAMPLE = r"""
name: "sample/v1/sample.proto"
package: "sample.v1"
dependency: "google/api/annotations.proto"
dependency: "google/api/httpbody.proto"
message_type {
  name: "Item"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field {
    name: "labels" number: 2 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".sample.v1.Item.LabelsEntry"
  }
  field { name: "text" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  field { name: "data" number: 4 label: LABEL_OPTIONAL type: TYPE_BYTES oneof_index: 0 }
  field { name: "size" number: 5 label: LABEL_OPTIONAL type: TYPE_UINT64 }
  field { name: "parent" number: 6 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".sample.v1.Item" }
  nested_type {
    name: "LabelsEntry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_INT32 }
    options { map_entry: true }
  }
  oneof_decl { name: "content" }
}
message_type {
  name: "GetItemRequest"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "view" number: 2 label: LABEL_OPTIONAL type: TYPE_ENUM type_name: ".sample.v1.View" }
  field { name: "page" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".sample.v1.Page" }
}
message_type {
  name: "Page"
  field { name: "size" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
}
message_type {
  name: "UpdateItemRequest"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "item" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".sample.v1.Item" }
  field { name: "force" number: 3 label: LABEL_OPTIONAL type: TYPE_BOOL }
}
message_type {
  name: "ChatRequest"
  field { name: "text" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "stream" number: 2 label: LABEL_OPTIONAL type: TYPE_BOOL }
}
message_type {
  name: "ChatResponse"
  field { name: "text" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
}
message_type {
  name: "ChatChunk"
  field { name: "delta" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
}
enum_type {
  name: "View"
  value { name: "VIEW_UNSPECIFIED" number: 0 }
  value { name: "VIEW_FULL" number: 1 }
}
service {
  name: "ItemService"
  method {
    name: "GetItem"
    input_type: ".sample.v1.GetItemRequest"
    output_type: ".sample.v1.Item"
    options {
      [google.api.http] {
        get: "/items/{name=**}"
        additional_bindings { custom { kind: "HEAD" path: "/items/{name}" } }
      }
    }
  }
  method {
    name: "UpdateItem"
    input_type: ".sample.v1.UpdateItemRequest"
    output_type: ".sample.v1.Item"
    options { [google.api.http] { patch: "/items/{name}" body: "item" } }
  }
  method {
    name: "Chat"
    input_type: ".sample.v1.ChatRequest"
    output_type: ".sample.v1.ChatResponse"
    options { [google.api.http] { post: "/chat" body: "*" } }
  }
  method {
    name: "ChatStream"
    input_type: ".sample.v1.ChatRequest"
    output_type: ".sample.v1.ChatChunk"
    server_streaming: true
  }
  method {
    name: "ChatStreamSse"
    input_type: ".sample.v1.ChatRequest"
    output_type: ".google.api.HttpBody"
    server_streaming: true
    options { [google.api.http] { post: "/chat:stream" body: "*" } }
  }
  method {
    name: "Unannotated"
    input_type: ".sample.v1.GetItemRequest"
    output_type: ".sample.v1.Item"
  }
}
syntax: "proto3"
"""


@pytest.fixture(scope="module")
def sample() -> dict[str, Any]:
    files = descriptor_set(generation_pb2.DESCRIPTOR, openai_pb2.DESCRIPTOR)
    files.file.append(text_format.Parse(SAMPLE, descriptor_pb2.FileDescriptorProto()))
    document = build_document(files, package="sample.v1")
    validate(document)
    return document


def test_a_get_binds_the_other_fields_to_query_parameters(sample: dict[str, Any]) -> None:
    operation = sample["paths"]["/items/{name}"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["name"]["in"] == "path"
    assert params["view"] == {"name": "view", "in": "query", "schema": {"$ref": "#/components/schemas/View"}}
    assert params["page.size"]["in"] == "query"
    assert "requestBody" not in operation


def test_additional_bindings_and_custom_verbs_are_operations(sample: dict[str, Any]) -> None:
    assert sample["paths"]["/items/{name}"]["head"]["operationId"] == "ItemService_GetItem_1"
    assert ("PATCH", "/items/{name}") in routes(sample)
    assert not any(
        op["operationId"].startswith("ItemService_Unannotated")
        for op in sample["paths"]["/items/{name}"].values()
    )


def test_a_body_field_is_the_request_body_and_the_rest_are_query_parameters(sample: dict[str, Any]) -> None:
    operation = sample["paths"]["/items/{name}"]["patch"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Item"
    }
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["force"]


def test_maps_oneofs_and_uint64(sample: dict[str, Any]) -> None:
    item = sample["components"]["schemas"]["Item"]["properties"]
    assert item["labels"] == {
        "type": "object",
        "additionalProperties": {"type": "integer", "format": "int32"},
    }
    assert "Set at most one of this and `data`" in item["text"]["description"]
    assert item["size"]["type"] == ["integer", "string"] and item["size"]["format"] == "uint64"
    assert item["parent"] == {"$ref": "#/components/schemas/Item"}
    assert "Item.LabelsEntry" not in sample["components"]["schemas"]


def test_envoy_serves_the_files_by_absolute_path_and_a_missing_one_as_a_503(tmp_path: Path) -> None:
    text = render_config(1, 2, "gateway:50051", tmp_path / "inference.pb", docs_assets=tmp_path / "none")
    served = re.findall(
        r"direct_response: \{status: (\d+), body: \{(filename|inline_string): \"([^\"]*)\"", text
    )
    by_status = {
        status: [(kind, value) for s, kind, value in served if s == status] for status in ("200", "503")
    }
    files = [Path(value) for kind, value in by_status["200"] if kind == "filename"]
    assert {path.name for path in files} == {"docs.html", "redoc.html"}
    assert all(path.is_absolute() and path.is_file() for path in files)
    messages = [value for _, value in by_status["503"]]
    assert len(messages) == 4
    assert any(str(tmp_path / "openapi.json") in m and "make descriptor" in m for m in messages)
    assert sum("make install" in m for m in messages) == 3


def test_an_http_body_stream_documents_the_events_of_its_typed_sibling(sample: dict[str, Any]) -> None:
    chat = sample["paths"]["/chat"]["post"]
    assert chat["responses"]["200"]["content"]["text/event-stream"]["schema"] == {
        "$ref": "#/components/schemas/ChatChunk"
    }
    assert "`POST /chat:stream`" in chat["description"]
    stream = sample["paths"]["/chat:stream"]["post"]
    assert "Also reached through `POST /chat`" in stream["description"]
    assert "`POST /chat`" in sample["info"]["description"]
