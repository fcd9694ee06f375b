"""Envoy's upstream TLS rendered without starting Envoy: its SDS files beside the configuration
(or in a private temporary folder), written through a partial file of their own, and each
upstream's certificate checked against the name dialled (SNI for host names, an IP SAN for
addresses, or ENVOY_UPSTREAM_TLS_SERVER_NAME)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.envoy_config import render_config


def pem_files(folder: Path) -> tuple[str, str, str]:
    # Envoy is not started: any files do.
    paths = [folder / name for name in ("ca.pem", "envoy.crt", "envoy.key")]
    for path in paths:
        path.write_text("PEM\n")
    ca, cert, key = (str(path) for path in paths)
    return ca, cert, key


def render(folder: Path, sds_dir: str = "", server_name: str = "", gateway: str = "127.0.0.1:50051") -> str:
    ca, cert, key = pem_files(folder)
    return render_config(
        8080,
        9901,
        gateway,
        Path("/x.pb"),
        predictions_address="predictions:50054",
        upstream_tls_ca=ca,
        upstream_tls_cert=cert,
        upstream_tls_key=key,
        tls_sds_dir=sds_dir,
        upstream_tls_server_name=server_name,
    )


def contexts(text: str) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(text)
    return {
        cluster["name"]: cluster["transport_socket"]["typed_config"]
        for cluster in config["static_resources"]["clusters"]
        if "transport_socket" in cluster and cluster["name"] in ("gateway", "predictions")
    }


def sds_paths(text: str) -> set[Path]:
    found = set()
    for context in contexts(text).values():
        common = context["common_tls_context"]
        for secret in common["tls_certificate_sds_secret_configs"]:
            found.add(Path(secret["sds_config"]["path_config_source"]["path"]))
        ca = common["combined_validation_context"]["validation_context_sds_secret_config"]
        found.add(Path(ca["sds_config"]["path_config_source"]["path"]))
    return found


def test_the_upstream_sds_files_go_beside_the_configuration(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    paths = sds_paths(render(tmp_path, str(run_dir)))
    assert {path.parent for path in paths} == {run_dir.absolute()}
    assert all(path.is_file() for path in paths)
    # Written through a partial file that is gone once renamed into place.
    assert sorted(item.name for item in run_dir.iterdir()) == [
        "upstream-ca.yaml",
        "upstream-certificate.yaml",
    ]


def test_without_a_folder_each_render_gets_a_private_one(tmp_path: Path) -> None:
    first, second = (sds_paths(render(tmp_path)) for _ in range(2))
    folders = {path.parent for path in first | second}
    assert len(folders) == 2  # not one predictable shared folder
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_planted_partial_file_is_not_written_through(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    # The old fixed name: another user's link there must not redirect the write.
    (run_dir / "upstream-ca.yaml.partial").symlink_to(victim)
    render(tmp_path, str(run_dir))
    assert victim.read_text() == "untouched"
    assert "upstream_ca" in (run_dir / "upstream-ca.yaml").read_text()


def test_an_address_is_checked_as_an_ip_san_and_a_host_name_as_sni_and_dns_san(tmp_path: Path) -> None:
    found = contexts(render(tmp_path, str(tmp_path)))
    gateway, predictions = found["gateway"], found["predictions"]
    assert "sni" not in gateway  # SNI carries host names only
    san = gateway["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert san["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}
    ]
    assert predictions["sni"] == "predictions"
    san = predictions["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert san["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "predictions"}}]


def test_a_configured_server_name_replaces_each_clusters_host(tmp_path: Path) -> None:
    found = contexts(render(tmp_path, str(tmp_path), server_name="tiers.internal"))
    for context in found.values():
        assert context["sni"] == "tiers.internal"
        validation = context["common_tls_context"]["combined_validation_context"]
        assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": "tiers.internal"}}
        ]


@pytest.mark.parametrize("variable", ["ENVOY_UPSTREAM_TLS_SERVER_NAME"])
def test_the_server_name_is_a_documented_setting(variable: str) -> None:
    root = Path(__file__).resolve().parents[2]
    assert variable in (root / "docs" / "deployment.md").read_text()
