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
    # "fp32", or "bf16": float32 weights run under bf16 autocast (services/embedder/precision.py).
    precision: str = "fp32"
    # Whether a bf16 model that strays from its fp32 self on the probe texts is served in fp32.
    verify_precision: bool = False
