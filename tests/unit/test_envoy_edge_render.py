"""envoy/render.py's edge hardening and TLS: EdgeLimits into the listener, the connection manager,
the buffer filter and the overload manager; the SDS file for a certificate (no Envoy, no process)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.envoy_config import ROOT, edge_limits, main, render_module
from tools.run import make_plan

render: Any = render_module()
TEMPLATE = (ROOT / "envoy" / "envoy.yaml").read_text()


def manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    result: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return result


def heap_and_connections(config: dict[str, Any]) -> tuple[int, int]:
    monitors = {m["name"]: m["typed_config"] for m in config["overload_manager"]["resource_monitors"]}
    return (
        monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"],
        monitors["envoy.resource_monitors.global_downstream_max_connections"][
            "max_active_downstream_connections"
        ],
    )


def route_body_limits(config: dict[str, Any]) -> dict[str, Any]:
    """path or prefix -> the route's buffer override (max bytes, "off", or None: the filter's own)."""
    limits: dict[str, Any] = {}
    for route in manager(config)["route_config"]["virtual_hosts"][0]["routes"]:
        if "route" not in route:
            continue
        match = route["match"].get("path") or route["match"].get("prefix")
        override = route.get("typed_per_filter_config", {}).get("envoy.filters.http.buffer")
        if override is None:
            limits[match] = None
        elif override.get("disabled"):
            limits[match] = "off"
        else:
            limits[match] = override["buffer"]["max_request_bytes"]
    return limits


def test_the_checked_in_file_holds_the_defaults() -> None:
    # Applying the defaults changes nothing: envoy.yaml and EdgeLimits() agree on every number.
    config = yaml.safe_load(TEMPLATE)
    render.apply_edge(config, render.EdgeLimits())
    assert config == yaml.safe_load(TEMPLATE)
    assert render.with_edge(TEMPLATE, render.EdgeLimits()) == TEMPLATE


def test_limits_reach_every_place_they_bound() -> None:
    limits = render.EdgeLimits(
        request_headers_timeout_seconds=1.5,
        request_timeout_seconds=7,
        idle_timeout_seconds=0.25,
        max_request_headers_kb=16,
        max_headers_count=50,
        text_body_bytes=2 * 1024 * 1024,
        embeddings_body_bytes=40 * 1024 * 1024,
        max_connections=123,
        max_heap_bytes=256 * 1024 * 1024,
        http2_max_concurrent_streams=64,
        http2_initial_stream_window_bytes=131072,
        http2_initial_connection_window_bytes=2 * 1024 * 1024,
    )
    config = yaml.safe_load(render.with_edge(TEMPLATE, limits))
    hcm = manager(config)
    assert hcm["request_headers_timeout"] == "1.5s"
    assert hcm["request_timeout"] == "7s"
    assert hcm["stream_idle_timeout"] == "0s"  # a stream being answered is never cut
    assert hcm["common_http_protocol_options"] == {"idle_timeout": "0.25s", "max_headers_count": 50}
    assert hcm["max_request_headers_kb"] == 16
    assert hcm["http2_protocol_options"] == {
        "max_concurrent_streams": 64,
        "initial_stream_window_size": 131072,
        "initial_connection_window_size": 2 * 1024 * 1024,
    }
    assert heap_and_connections(config) == (256 * 1024 * 1024, 123)
    (buffer,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
    assert buffer["typed_config"]["max_request_bytes"] == 2 * 1024 * 1024
    assert hcm["http_filters"][0] is buffer, "bodies are bounded before the Lua filter reads them"
    assert route_body_limits(config) == {
        "/inference.v1.PredictionService/": "off",
        "/inference.v1.": "off",
        "/v1/embeddings": 40 * 1024 * 1024,
        "/embeddings": 40 * 1024 * 1024,
        "/": None,
    }
    (listener,) = config["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] == 40 * 1024 * 1024
    messages = json.dumps(hcm["local_reply_config"])
    assert "the limit is 2 MiB (2097152 bytes)" in messages
    assert "the limit for embeddings is 40 MiB (41943040 bytes)" in messages
    assert "transport_socket" not in listener["filter_chains"][0]


def test_overload_sheds_before_the_heap_bound() -> None:
    config = yaml.safe_load(TEMPLATE)
    actions = {
        action["name"].rsplit(".", 1)[1]: action["triggers"][0]["threshold"]["value"]
        for action in config["overload_manager"]["actions"]
    }
    assert actions["stop_accepting_requests"] < 1.0
    assert actions["disable_http_keepalive"] < actions["stop_accepting_requests"]
    assert actions["shrink_heap"] <= actions["disable_http_keepalive"]


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("max_headers_count", 0, "max_headers_count (ENVOY_MAX_HEADERS_COUNT) must be a number from 1"),
        ("max_request_headers_kb", 9000, "from 1 to 8192, got 9000"),
        ("request_timeout_seconds", -1, "request_timeout_seconds (ENVOY_REQUEST_TIMEOUT_SECONDS)"),
        ("text_body_bytes", 1 << 33, "text_body_bytes (ENVOY_TEXT_BODY_BYTES)"),
        ("http2_initial_stream_window_bytes", 100, "from 65535"),
        ("max_connections", True, "got True"),
    ],
)
def test_bad_limits_are_named(name: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        render.EdgeLimits(**{name: value})


def test_limits_come_from_the_environment_then_flags() -> None:
    env = {"ENVOY_REQUEST_TIMEOUT_SECONDS": "12.5", "ENVOY_MAX_CONNECTIONS": "77"}
    limits = edge_limits(env, max_connections=88)
    assert (limits.request_timeout_seconds, limits.max_connections) == (12.5, 88)
    with pytest.raises(ValueError, match="ENVOY_MAX_CONNECTIONS='many' is not an integer"):
        edge_limits({"ENVOY_MAX_CONNECTIONS": "many"})


def test_every_limit_is_documented() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for item in dataclasses.fields(render.EdgeLimits):
        assert f"`{item.metadata['env']}`" in docs, item.name
        assert f"`--{item.name.replace('_', '-')}`" in docs, item.name
    for name in ("ENVOY_TLS_CERT", "ENVOY_TLS_KEY"):
        assert f"`{name}`" in docs


def test_tls_serves_the_certificate_through_sds(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "tls.crt").write_text("cert")
    (certs / "tls.key").write_text("key")
    tls = render.edge_tls(str(certs / "tls.crt"), str(certs / "tls.key"), str(tmp_path / "sds"))
    config = yaml.safe_load(render.with_edge(TEMPLATE, render.EdgeLimits(), tls))
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    (secret,) = context["tls_certificate_sds_secret_configs"]
    source = secret["sds_config"]["path_config_source"]
    assert source == {
        "path": str(tmp_path / "sds" / "edge-tls-sds.json"),
        "watched_directory": {"path": str(tmp_path / "sds")},
    }
    assert chain["transport_socket_connect_timeout"] == "10s"
    assert config["node"]["id"] and config["node"]["cluster"]
    (resource,) = json.loads(Path(source["path"]).read_text())["resources"]
    assert resource["name"] == secret["name"]
    assert resource["tls_certificate"] == {
        "certificate_chain": {"filename": str(certs / "tls.crt")},
        "private_key": {"filename": str(certs / "tls.key")},
        "watched_directory": {"path": str(certs)},
    }


def test_tls_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("cert")
    assert render.edge_tls("", "") is None
    with pytest.raises(ValueError, match="ENVOY_TLS_CERT and ENVOY_TLS_KEY go together"):
        render.edge_tls(str(tmp_path / "tls.crt"), "")
    with pytest.raises(ValueError, match=r"ENVOY_TLS_KEY: .*missing\.key is not a file"):
        render.edge_tls(str(tmp_path / "tls.crt"), str(tmp_path / "missing.key"))


def test_the_tool_refuses_a_bad_limit_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--max-heap-bytes", "10"])
    assert "max_heap_bytes (ENVOY_MAX_HEAP_BYTES) must be a number from 1048576" in capsys.readouterr().err


def test_make_run_passes_the_edge_settings_and_probes_https_on_the_admin_port(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("cert")
    (tmp_path / "tls.key").write_text("key")
    procfile = tmp_path / "Procfile"
    procfile.write_text((ROOT / "Procfile").read_text())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    environ = {
        "ENVOY_TLS_CERT": str(tmp_path / "tls.crt"),
        "ENVOY_TLS_KEY": str(tmp_path / "tls.key"),
        "ENVOY_MAX_CONNECTIONS": "321",
    }
    plan = make_plan(environ, run_dir, procfile)
    (envoy,) = [tier for tier in plan.tiers if tier.name == "envoy"]
    assert (envoy.port, envoy.health_path) == (9901, "/ready")
    config = yaml.safe_load(Path(plan.env["ENVOY_CONFIG"]).read_text())
    assert heap_and_connections(config)[1] == 321
    assert "transport_socket" in config["static_resources"]["listeners"][0]["filter_chains"][0]
    assert (run_dir / "edge-tls-sds.json").is_file()
    with pytest.raises(SystemExit, match="make run: ENVOY_MAX_CONNECTIONS='x' is not an integer"):
        make_plan({"ENVOY_MAX_CONNECTIONS": "x"}, run_dir, procfile)
