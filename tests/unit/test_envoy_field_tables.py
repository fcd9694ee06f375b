"""envoy/render.py's descriptor -> strict-field tables, templates -> Lua patterns, and CORS
policy, on a small descriptor built here (no Envoy, no process)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

from tools.envoy_config import render_module

render: Any = render_module()
Field = descriptor_pb2.FieldDescriptorProto


def field(
    name: str, number: int, kind: Any = Field.TYPE_STRING, type_name: str = "", repeated: bool = False
) -> Any:
    label = Field.LABEL_REPEATED if repeated else Field.LABEL_OPTIONAL
    return Field(name=name, number=number, type=kind, type_name=type_name, label=label)


def descriptor() -> bytes:
    struct = descriptor_pb2.FileDescriptorProto(
        name="google/protobuf/struct.proto", package="google.protobuf"
    )
    struct.message_type.add(name="Value")
    test = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t.v1")
    knobs = test.message_type.add(name="Knobs")
    knobs.field.extend([field("top_k", 1, Field.TYPE_INT32), field("temperature", 2, Field.TYPE_FLOAT)])
    item = test.message_type.add(name="Item")
    item.field.extend([field("role", 1), field("content", 2)])
    request = test.message_type.add(name="Request")
    entry = request.nested_type.add(name="TagsEntry")
    entry.options.map_entry = True
    entry.field.extend([field("key", 1), field("value", 2, Field.TYPE_MESSAGE, ".t.v1.Item")])
    request.field.extend(
        [
            field("prompt_text", 1),
            field("items", 2, Field.TYPE_MESSAGE, ".t.v1.Item", repeated=True),
            field("knobs", 3, Field.TYPE_MESSAGE, ".t.v1.Knobs"),
            field("tags", 4, Field.TYPE_MESSAGE, ".t.v1.Request.TagsEntry", repeated=True),
            field("extra", 5, Field.TYPE_MESSAGE, ".google.protobuf.Value"),
        ]
    )
    test.message_type.add(name="Empty")
    service = test.service.add(name="S")
    for name, rule in (
        ("Post", http_pb2.HttpRule(post="/post", body="*")),
        ("Get", http_pb2.HttpRule(get="/get/{name=**}")),
        ("Put", http_pb2.HttpRule(put="/things/{id}:apply", body="*")),
        ("Knobs", http_pb2.HttpRule(post="/knobs", body="knobs")),
    ):
        method = service.method.add(name=name, input_type=".t.v1.Request", output_type=".t.v1.Empty")
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return descriptor_pb2.FileDescriptorSet(file=[struct, test]).SerializeToString()


def test_body_routes_are_found_and_body_less_ones_are_not() -> None:
    routes, _ = render.field_tables(descriptor())
    found = {(route.method, route.template, route.message) for route in routes}
    assert found == {
        ("POST", "/post", "t.v1.Request"),
        ("PUT", "/things/{id}:apply", "t.v1.Request"),
        ("POST", "/knobs", "t.v1.Knobs"),
    }


def test_messages_accept_proto_and_json_names_and_nest() -> None:
    _, rules = render.field_tables(descriptor())
    request = rules["t.v1.Request"]
    assert request.accepts == ["prompt_text", "items", "knobs", "tags", "extra"]
    assert request.fields["prompt_text"] == request.fields["promptText"] == render.FieldRule("prompt_text")
    assert request.fields["items"] == render.FieldRule("items", "t.v1.Item", "list")
    assert request.fields["knobs"] == render.FieldRule("knobs", "t.v1.Knobs", "one")
    # Map values are checked; a google.protobuf.Value takes any JSON.
    assert request.fields["tags"] == render.FieldRule("tags", "t.v1.Item", "map")
    assert request.fields["extra"] == render.FieldRule("extra")
    assert "google.protobuf.Value" not in rules and "t.v1.Request.TagsEntry" not in rules
    assert rules["t.v1.Knobs"].fields["topK"].name == "top_k"
    # A key of a nested message's field at the top level is a hint, not accepted.
    assert request.hints["temperature"] == "knobs" and "temperature" not in request.fields


def test_the_lua_tables_hold_exact_routes_patterns_and_messages() -> None:
    routes, rules = render.field_tables(descriptor())
    text = render.lua_tables(routes, rules)
    assert text.startswith("local strict = {") and text.endswith("}")
    assert '["POST /post"] = "t.v1.Request",' in text
    assert '{"PUT", "^/things/[^/]+:apply$", "t.v1.Request"},' in text
    assert '["items"] = {"items", "t.v1.Item", "list"},' in text
    assert 'accepts = "prompt_text, items, knobs, tags, extra",' in text


@pytest.mark.parametrize(
    ("template", "path", "matches"),
    [
        ("/v1/models/{model=**}", "/v1/models/org/name", True),
        ("/v1/models/{model=**}", "/v1/models/", False),
        ("/things/{id}:apply", "/things/7:apply", True),
        ("/things/{id}:apply", "/things/7/8:apply", False),
        ("/a.b/*", "/a.b/c", True),
        ("/a.b/*", "/axb/c", False),
    ],
)
def test_templates_become_lua_patterns(template: str, path: str, matches: bool) -> None:
    pattern = render._lua_pattern(template)
    # Lua's %x escapes and classes read the same as these regular expressions here.
    regex = re.sub(r"%(.)", r"\\\1", pattern)
    assert bool(re.fullmatch(regex, path)) is matches


def test_the_real_descriptor_covers_the_native_and_openai_routes() -> None:
    from tests.fixtures_gateway import DESCRIPTOR

    if not DESCRIPTOR.exists():
        pytest.skip("build/inference.pb is missing: run `make descriptor`")
    routes, rules = render.field_tables(DESCRIPTOR.read_bytes())
    templates = {route.template for route in routes}
    assert {"/generate", "/embeddings", "/v1/chat/completions", "/v1/embeddings"} <= templates
    assert rules["inference.v1.GenerateRequest"].hints["temperature"] == "parameters"
    # PredictionService: the create body, the PATCH body and a deployment body (body: "deployment").
    bodies = {(route.method, route.template): route.message for route in routes}
    assert bodies[("POST", "/v1/predictions")] == "inference.v1.CreatePredictionRequest"
    assert bodies[("PATCH", "/v1/deployments/{name}")] == "inference.v1.UpdateDeploymentRequest"
    assert bodies[("POST", "/v1/deployments")] == "inference.v1.Deployment"
    assert ("POST", "/v1/predictions/{id}/cancel") not in bodies
    # input, defaults and input_schema are Structs: any JSON inside, checked by the service.
    assert rules["inference.v1.CreatePredictionRequest"].fields["input"].message == ""


def test_rendering_puts_the_tables_in_place_of_the_placeholder(tmp_path: Any) -> None:
    path = tmp_path / "t.pb"
    path.write_bytes(descriptor())
    text = render.render_envoy_config(1, 2, "gw:3", str(path))
    assert render.STRICT_PLACEHOLDER not in text and '["POST /post"]' in text
    # Without a descriptor (Envoy cannot start either) the placeholder stays, failing loudly.
    assert render.STRICT_PLACEHOLDER in render.render_envoy_config(1, 2, "gw:3", str(tmp_path / "none.pb"))


def test_cors_policy_from_origins() -> None:
    assert render.cors_policy("") is None and render.cors_policy(" , ") is None
    policy = render.cors_policy("http://localhost:8501, *")
    assert policy["allow_origin_string_match"] == [
        {"exact": "http://localhost:8501"},
        {"safe_regex": {"regex": ".*"}},
    ]
    assert "retry-after" in policy["expose_headers"] and "x-api-key" in policy["allow_headers"]
    with pytest.raises(ValueError, match="scheme://host"):
        render.cors_policy("localhost:8501")


def test_cors_is_rendered_only_with_origins(tmp_path: Any) -> None:
    assert "envoy.filters.http.cors" not in render.render_envoy_config(1, 2, "gw:3", str(tmp_path / "x.pb"))
    text = render.render_envoy_config(1, 2, "gw:3", str(tmp_path / "x.pb"), cors_origins="https://a.example")
    assert "envoy.filters.http.cors" in text and "https://a.example" in text


def test_the_routes_documented_as_201_are_the_ones_envoy_answers_201() -> None:
    from tools.openapi import CREATED_ROUTES

    lua = render.TEMPLATE.read_text()
    for method, path in CREATED_ROUTES:
        assert f'method == "{method.upper()}" and bare == "{path}"' in lua
    assert lua.count('dynamicMetadata():set("inference.edge", "created", true)') == len(CREATED_ROUTES)
