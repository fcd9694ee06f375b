"""Generator memory: the resident size of the served default model (the gguf backend where it
runs) against ONNX Runtime prefilling and decoding (`--backend onnx`), measured in one run so that
the ratio is comparable.

    .venv/bin/python bench/bench_generator_memory.py
    .venv/bin/python bench/bench_generator_memory.py --versus "--backend torch"

Each setup is started as its own process, as in production, serves 8 streams of 64 tokens, and
is read from /proc: resident now (VmRSS) and at its peak (VmHWM). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_generator import over_grpc, prompts_for  # noqa: E402  (this folder is on sys.path)

from tests.fixtures_generator import start_generator  # noqa: E402


def resident_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    now, peak = (int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM"))
    return now, peak


def measure(server_args: list[str]) -> tuple[float, float]:
    service = start_generator(server_args)
    try:
        asyncio.run(over_grpc(service.address, prompts_for(0, 8), 64))
        process = service.process.process
        assert process is not None
        return resident_mib(process.pid)
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versus", default="--backend onnx", help="the compared setup's generator flags")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setups = {"default": [], args.versus: args.versus.split()}
    results = {label: measure(flags) for label, flags in setups.items()}
    print("| setup | resident after serving | peak resident |")
    print("|---|---|---|")
    for label, (now, peak) in results.items():
        print(f"| {label} | {now:.0f} MiB | {peak:.0f} MiB |")
    (default_now, default_peak), (other_now, other_peak) = results.values()
    print(
        f"default / ({args.versus}): {default_now / other_now:.2f}x resident, "
        f"{default_peak / other_peak:.2f}x peak"
    )


if __name__ == "__main__":
    main()
