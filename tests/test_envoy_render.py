"""Envoy's config renderer: the rendered file uses the given ports and Envoy itself accepts it
(this starts `envoy --mode validate`, so it stays out of the fast tier)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.fixtures_gateway import render_envoy
from tests.stack import ROOT


def test_rendered_envoy_config_uses_the_given_ports_and_envoy_accepts_it(tmp_path: Path) -> None:
    text = render_envoy(18080, 19901, "127.0.0.1:15051", ROOT / "build" / "inference.pb")
    assert "port_value: 18080" in text and "port_value: 19901" in text and "port_value: 15051" in text
    assert "8080}" not in text.replace("18080}", "")
    envoy = shutil.which("envoy")
    assert envoy, "envoy is missing"
    (tmp_path / "envoy.yaml").write_text(text)
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--base-id", "93"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_envoy_admin_port_listens_on_loopback_only() -> None:
    text = render_envoy(1, 2, "gateway:50051", Path("/x.pb"))
    assert "socket_address: {address: 127.0.0.1, port_value: 2}" in text
    assert 'address: "gateway", port_value: 50051' in text
