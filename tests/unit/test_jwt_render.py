"""Envoy's JWT settings rendered without starting Envoy: the claims header always stripped from
clients, the jwt_authn filter only with an issuer (file or URL JWKS, open routes, the bearer-JWT
rule), its refusals mapped to 401 in the route's shape, and bad settings named."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.envoy_config import JwtEdge, render_config, render_module
from tools.run import ROOT, make_plan


def manager(text: str) -> dict[str, Any]:
    config = yaml.safe_load(text)
    found: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return found


def names(text: str) -> list[str]:
    return [f["name"] for f in manager(text)["http_filters"]]


def jwks(tmp_path: Path) -> str:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    return str(path)


def test_without_an_issuer_the_header_is_still_stripped_and_no_jwt_filter_runs() -> None:
    text = render_config(1, 2, "gateway:50051", Path("/x.pb"))
    assert names(text)[0] == "envoy.filters.http.header_mutation"
    assert "envoy.filters.http.jwt_authn" not in names(text)
    mutation = manager(text)["http_filters"][0]["typed_config"]["mutations"]
    assert mutation == {"request_mutations": [{"remove": "x-jwt-payload"}]}
    # The rest of the template is left as written (flow style), not re-dumped.
    assert "socket_address: {address: 127.0.0.1, port_value: 2}" in text


def test_a_file_jwks_provider_verifies_bearer_jwts_only(tmp_path: Path) -> None:
    edge = JwtEdge("https://issuer.test", "inference, other", jwks(tmp_path), clock_skew_seconds=30)
    text = render_config(1, 2, "gateway:50051", Path("/x.pb"), jwt=edge)
    # Verified before the body is buffered, read by the Lua filter or transcoded.
    assert names(text)[:4] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.buffer",
        "envoy.filters.http.lua",
    ]
    config = manager(text)["http_filters"][1]["typed_config"]
    provider = config["providers"]["edge"]
    assert provider["issuer"] == "https://issuer.test" and provider["audiences"] == ["inference", "other"]
    assert provider["local_jwks"] == {"filename": str(tmp_path / "jwks.json")}
    assert provider["clock_skew_seconds"] == 30 and provider["require_expiration"] is True
    assert provider["forward_payload_header"] == "x-jwt-payload" and provider["forward"] is False
    rules = config["rules"]
    assert [rule["match"] for rule in rules[:-1]] == [
        {"path": "/healthz"},
        {"path": "/openapi.json"},
        {"prefix": "/docs"},
        {"prefix": "/redoc"},
    ]
    assert all("requires" not in rule for rule in rules[:-1])
    (header,) = rules[-1]["match"]["headers"]
    regex = header["string_match"]["safe_regex"]["regex"]
    assert rules[-1]["requires"] == {"provider_name": "edge"}
    assert re.match(regex, "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_x")
    assert not re.match(regex, "Bearer sk-test-user-0123456789abcdef")
    assert not re.match(regex, "Bearer a.b.c.d")


def test_jwt_refusals_become_401_in_each_routes_shape(tmp_path: Path) -> None:
    edge = JwtEdge("https://issuer.test", "inference", jwks(tmp_path))
    mappers = manager(render_config(1, 2, "gateway:50051", Path("/x.pb"), jwt=edge))["local_reply_config"][
        "mappers"
    ]
    openai, native, grpc_native = mappers[:3]
    assert openai["status_code"] == native["status_code"] == grpc_native["status_code"] == 401
    assert openai["body_format_override"]["json_format"]["error"]["type"] == "authentication_error"
    assert native["body_format_override"]["json_format"] == {"code": 16, "message": "%LOCAL_REPLY_BODY%"}
    assert "body_format_override" not in grpc_native


def test_a_jwks_url_gets_its_own_tls_cluster() -> None:
    url = "https://login.example.com:8443/realms/x/certs"
    text = render_config(1, 2, "gateway:50051", Path("/x.pb"), jwt=JwtEdge("iss", "aud", jwks_url=url))
    provider = manager(text)["http_filters"][1]["typed_config"]["providers"]["edge"]
    remote = provider["remote_jwks"]
    assert remote["http_uri"] == {"uri": url, "cluster": "jwks", "timeout": "5s"}
    assert remote["cache_duration"] == "300s" and "async_fetch" in remote
    (cluster,) = [c for c in yaml.safe_load(text)["static_resources"]["clusters"] if c["name"] == "jwks"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "login.example.com", "port_value": 8443}
    assert cluster["transport_socket"]["typed_config"]["sni"] == "login.example.com"
    plain = render_module().jwks_cluster("http://idp/jwks")
    assert "transport_socket" not in plain
    assert plain["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ] == {"address": "idp", "port_value": 80}


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        (JwtEdge("iss", "", "FILE"), "jwt_audiences"),
        (JwtEdge("iss", "aud"), "exactly one of jwt_jwks_file and jwt_jwks_url"),
        (JwtEdge("iss", "aud", "FILE", "https://x/jwks"), "exactly one"),
        (JwtEdge("iss", "aud", "/nonexistent/jwks.json"), "does not exist"),
        (JwtEdge("iss", "aud", jwks_url="ftp://x/jwks"), "http\\(s\\) URL"),
        (JwtEdge("iss", "aud", "FILE", clock_skew_seconds=-1), "0..3600"),
        (JwtEdge("", "aud"), "jwt_issuer must be set"),
        (JwtEdge(claims_header="X-Payload"), "jwt_claims_header"),
    ],
)
def test_bad_jwt_settings_are_named(tmp_path: Path, edge: JwtEdge, message: str) -> None:
    if edge.jwks_file == "FILE":
        edge = JwtEdge(edge.issuer, edge.audiences, jwks(tmp_path), edge.jwks_url, edge.clock_skew_seconds)
    with pytest.raises(ValueError, match=message):
        render_config(1, 2, "gateway:50051", Path("/x.pb"), jwt=edge)


def test_the_environment_sets_the_edge_and_a_bad_skew_is_named() -> None:
    edge = JwtEdge.from_env(
        {
            "ENVOY_JWT_ISSUER": "iss",
            "ENVOY_JWT_AUDIENCES": "a,b",
            "ENVOY_JWT_JWKS_URL": "https://x/jwks",
            "ENVOY_JWT_CLOCK_SKEW_SECONDS": "5",
        }
    )
    assert edge == JwtEdge("iss", "a,b", "", "https://x/jwks", 5, "x-jwt-payload")
    assert JwtEdge.from_env({}).clock_skew_seconds == 60
    with pytest.raises(ValueError, match="ENVOY_JWT_CLOCK_SKEW_SECONDS"):
        JwtEdge.from_env({"ENVOY_JWT_CLOCK_SKEW_SECONDS": "1m"})


def test_make_run_passes_envoy_jwt_settings_and_wires_the_tiers(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text((ROOT / "Procfile").read_text())
    environ = {
        "ENVOY_PORT": "18080",
        "ENVOY_JWT_ISSUER": "https://issuer.test",
        "ENVOY_JWT_AUDIENCES": "inference",
        "ENVOY_JWT_JWKS_FILE": jwks(tmp_path),
        "GATEWAY_JWT_SCOPE_MAP": "inference:embed=embed",
    }
    plan = make_plan(environ, tmp_path, procfile)
    env = plan.env
    assert env["GATEWAY_JWT_CLAIMS_HEADER"] == env["PREDICTIONS_JWT_CLAIMS_HEADER"] == "x-jwt-payload"
    assert env["PREDICTIONS_JWT_SCOPE_MAP"] == "inference:embed=embed"
    assert env["GATEWAY_HOST"] == env["PREDICTIONS_HOST"] == "127.0.0.1"
    rendered = (tmp_path / "envoy-18080.yaml").read_text()
    assert "envoy.filters.http.jwt_authn" in rendered and "https://issuer.test" in rendered
    # Without an issuer nothing about JWTs is set.
    plain = make_plan({"ENVOY_PORT": "18081"}, tmp_path, procfile).env
    assert "GATEWAY_JWT_CLAIMS_HEADER" not in plain and "PREDICTIONS_JWT_CLAIMS_HEADER" not in plain
