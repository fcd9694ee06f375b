"""Which precision the embedder computes in: one pure function of the CPU's traits and the flags,
returning the precision and the reason (or refusing, naming the flag). `auto` picks bf16 only where
the CPU multiplies bf16 natively, and each model loaded that way is checked against fp32 on probe texts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.machine import cpu_flags

Precision = Literal["fp32", "bf16"]

# The agreement a bf16 model must keep with its fp32 self on the probe texts, or auto serves fp32.
MIN_COSINE = 0.999

# Short, long, several scripts, code, emoji and whitespace: where reduced precision would show first.
PROBE_TEXTS = (
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Die Katze schläft auf dem warmen Fensterbrett, während draußen der Regen fällt.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "Москва — столица России, крупнейший по численности населения город страны.",
    "القاهرة هي عاصمة مصر وأكبر مدنها، وتقع على ضفاف نهر النيل.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "SELECT id, SUM(total) FROM orders GROUP BY id HAVING SUM(total) > 100;",
    "🚀 🌍 launch day 🎉",
    "  \t spaced \n\n  out \u3000 text  ",
    " ".join(f"token{i} about databases, gardening and orbital mechanics" for i in range(60)),
)


class PrecisionError(ValueError):
    """The flags ask for a precision this machine or backend cannot compute in."""


@dataclass(frozen=True)
class CpuTraits:
    avx512_bf16: bool
    amx_bf16: bool

    @property
    def fast_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    def bf16_units(self) -> str:
        """The bf16 instructions this CPU has, in words ("AMX and AVX512-BF16")."""
        units = (("AMX", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16))
        return " and ".join(name for name, present in units if present)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str
    # Whether a model loaded this way falls back to fp32 when its probe cosine is under MIN_COSINE.
    verify: bool = False


def cpu_traits() -> CpuTraits:
    """This CPU's bf16 instructions (none where its flags cannot be read)."""
    flags = cpu_flags()
    return CpuTraits(avx512_bf16="avx512_bf16" in flags, amx_bf16="amx_bf16" in flags)


def choose_precision(
    requested: str, device: str, backend: str, dtype: str, cpu: CpuTraits
) -> PrecisionChoice:
    """The precision for these flags (`device` already resolved) and why; raises PrecisionError
    naming the flag where an explicit bf16 cannot run here."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "--precision fp32")
    if requested == "bf16":
        if backend != "torch":
            raise PrecisionError(
                f"--precision bf16 runs on --backend torch; --backend {backend} computes in fp32"
            )
        if dtype != "float32":
            raise PrecisionError(f"--precision bf16 computes float32 weights in bf16; drop --dtype {dtype}")
        if device != "cpu":
            raise PrecisionError(
                f"--precision bf16 is for CPUs; on {device} use --dtype bfloat16 or --precision fp32"
            )
        if not cpu.fast_bf16:
            raise PrecisionError(
                "--precision bf16 needs a CPU with AVX512-BF16 or AMX, and this one has neither "
                "(bf16 would be emulated and slower than fp32); use --precision auto or fp32"
            )
        return PrecisionChoice("bf16", f"--precision bf16 (CPU has {cpu.bf16_units()})")
    if requested != "auto":
        raise PrecisionError(f"--precision {requested}: not one of auto, fp32, bf16")
    if backend != "torch":
        return PrecisionChoice("fp32", f"--backend {backend} computes in fp32")
    if dtype != "float32":
        return PrecisionChoice("fp32", f"--dtype {dtype} sets the weights' precision")
    if device != "cpu":
        return PrecisionChoice("fp32", f"bf16 autocast is chosen on CPUs only, this is {device}")
    if not cpu.fast_bf16:
        return PrecisionChoice("fp32", "the CPU has neither AVX512-BF16 nor AMX, so bf16 would be slower")
    return PrecisionChoice("bf16", f"CPU has {cpu.bf16_units()}", verify=True)
