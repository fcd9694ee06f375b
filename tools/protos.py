"""Generate Python messages, gRPC stubs, mypy stubs and Envoy's descriptor set from protos/.

`python tools/protos.py` writes the committed Python code under clients/python/src (import root
`inference.v1`, mirroring the proto package), the descriptor set to build/inference.pb, the
OpenAPI document beside it (build/openapi.json) and its committed copy docs/openapi.json.
`--descriptor-only` writes just the descriptor and build/openapi.json (neither is committed).
`python tools/protos.py --check` regenerates into a temporary folder and fails when the
committed code or docs/openapi.json differs from what the protos produce.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
PYTHON_ROOT = ROOT / "clients" / "python" / "src"
GENERATED_PACKAGE = Path("inference") / "v1"
DESCRIPTOR = ROOT / "build" / "inference.pb"
OPENAPI_COPY = ROOT / "docs" / "openapi.json"
PACKAGE_DOC = '"""Generated from protos/ by tools/protos.py; never edit by hand."""\n'


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / GENERATED_PACKAGE).glob("*.proto"))


def generate(python_out: Path, descriptor_out: Path) -> None:
    python_out.mkdir(parents=True, exist_ok=True)
    descriptor_out.parent.mkdir(parents=True, exist_ok=True)
    scripts = Path(sysconfig.get_path("scripts"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={python_out}",
        f"--grpc_python_out={python_out}",
        f"--mypy_out={python_out}",
        f"--mypy_grpc_out={python_out}",
        *proto_files(),
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    # Envoy writes google.rpc details into JSON error bodies only when their types are in the
    # descriptor set, and no inference proto imports error_details.proto.
    descriptor_command = [
        *command[:6],
        f"--descriptor_set_out={descriptor_out}",
        "--include_imports",
        # The proto comments become the OpenAPI document's descriptions.
        "--include_source_info",
        *proto_files(),
        "google/rpc/error_details.proto",
    ]
    subprocess.run(descriptor_command, check=True, cwd=ROOT)
    # Run as a module: this file runs as a script, without the repository on sys.path.
    openapi_command = [sys.executable, "-m", "tools.openapi", f"--descriptor={descriptor_out}"]
    subprocess.run([*openapi_command, f"--output={openapi_path(descriptor_out)}"], check=True, cwd=ROOT)
    for package in (python_out / "inference", python_out / GENERATED_PACKAGE):
        (package / "__init__.py").write_text(PACKAGE_DOC)
        (package / "py.typed").write_text("")


def openapi_path(descriptor: Path) -> Path:
    """Where the OpenAPI document of a descriptor is written: beside it (Envoy serves it)."""
    return descriptor.with_name("openapi.json")


def generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in (root / "inference").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "python"
        generate(fresh, Path(tmp) / "inference.pb")
        expected, committed = generated_files(fresh), generated_files(PYTHON_ROOT)
        problems = [f"missing: {p}" for p in sorted(expected - committed)]
        problems += [f"not generated from protos/: {p}" for p in sorted(committed - expected)]
        problems += [
            f"differs from protos/: {p}"
            for p in sorted(expected & committed)
            if not filecmp.cmp(fresh / p, PYTHON_ROOT / p, shallow=False)
        ]
        fresh_openapi = openapi_path(Path(tmp) / "inference.pb")
        if not OPENAPI_COPY.is_file() or not filecmp.cmp(fresh_openapi, OPENAPI_COPY, shallow=False):
            problems.append(f"differs from protos/: {OPENAPI_COPY.relative_to(ROOT)}")
    if problems:
        print("generated code is stale; run `make protos`:", *problems, sep="\n  ")
        return 1
    print(f"generated code matches protos/ ({len(expected)} files and {OPENAPI_COPY.name})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when the committed code is stale")
    parser.add_argument("--descriptor-only", action="store_true", help="write build/inference.pb only")
    args = parser.parse_args()
    if args.check:
        return check()
    if args.descriptor_only:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), DESCRIPTOR)
        print(f"wrote {DESCRIPTOR} and {openapi_path(DESCRIPTOR)}")
        return 0
    shutil.rmtree(PYTHON_ROOT / "inference", ignore_errors=True)
    generate(PYTHON_ROOT, DESCRIPTOR)
    shutil.copyfile(openapi_path(DESCRIPTOR), OPENAPI_COPY)
    print(f"wrote {PYTHON_ROOT / GENERATED_PACKAGE}, {DESCRIPTOR}, {OPENAPI_COPY} and the OpenAPI beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
