"""What a model is and how to load it, shared by the torch and ONNX paths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it."""

    name: str
    source: str
    device: str
    dtype: str
    # "torch", or "onnx": the transformer exported once and run by ONNX Runtime.
    backend: str = "torch"
    onnx_dir: str = ""
