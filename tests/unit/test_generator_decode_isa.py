"""Which build of the block decoder's kernel serves: chosen from the CPU's flags, or forced by
--decode-isa, refused with the missing flags named where the CPU lacks them."""

from __future__ import annotations

import pytest

from services.generator import gguf_decoder
from services.generator.config import GeneratorConfig
from services.generator.gguf_decoder import choose_isa

AVX2 = {"avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}


def test_auto_takes_avx512_where_the_cpu_has_vnni_and_says_why() -> None:
    isa, reason = choose_isa("auto", AVX512)
    assert isa == "avx512" and "VNNI" in reason
    isa, reason = choose_isa("auto", AVX512 - {"avx512_vnni"})
    assert (isa, reason) == ("avx2", "the CPU lacks avx512_vnni for the AVX-512 build")


def test_a_forced_isa_is_taken_or_refused_naming_what_the_cpu_lacks() -> None:
    assert choose_isa("avx2", AVX512) == ("avx2", "--decode-isa avx2")
    assert choose_isa("avx512", AVX512) == ("avx512", "--decode-isa avx512")
    with pytest.raises(ValueError, match="--decode-isa avx512: this CPU lacks avx512bw, avx512_vnni"):
        choose_isa("avx512", AVX2 | {"avx512f", "avx512vl"})
    with pytest.raises(ValueError, match="--decode-isa sse: not one of auto, avx2, avx512"):
        choose_isa("sse", AVX512)


def test_the_generator_refuses_at_start_an_isa_this_cpu_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setting is checked with the rest of the configuration, before any model is loaded."""
    monkeypatch.setattr(gguf_decoder, "_cpu_flags", lambda: set(AVX2))
    with pytest.raises(ValueError, match="--decode-isa avx512: this CPU lacks avx512f"):
        GeneratorConfig(decode_isa="avx512").validate()
    GeneratorConfig(decode_isa="avx2").validate()
    GeneratorConfig(decode_isa="auto").validate()
