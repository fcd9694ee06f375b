"""An ONNX Runtime stand-in for the Transformer module of a sentence-transformers model: exported with
torch.onnx once per model file (cached on disk); the later modules (pooling, dense layers) stay in torch."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from services.embedder.spec import ModelSpec

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Exportable(torch.nn.Module):
    """The Hugging Face model with positional inputs and the last hidden state as its output."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.names, inputs, strict=True)))
        hidden: torch.Tensor = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return hidden


def _cache_key(spec: ModelSpec) -> str:
    folder = Path(spec.source)
    parts = [str(folder.resolve()), torch.__version__]
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


class OnnxTransformer:
    """Callable like the Transformer module: features in, features with token_embeddings out."""

    def __init__(self, path: Path, names: tuple[str, ...], device: str) -> None:
        import onnxruntime  # type: ignore[import-untyped, import-not-found, unused-ignore]

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The same thread count as torch, so that --torch-threads governs both backends.
        options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self._names = names
        self.size_bytes = path.stat().st_size

    @classmethod
    def export(cls, module: Any, spec: ModelSpec) -> OnnxTransformer:
        model = getattr(module, "model", None) or getattr(module, "auto_model", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError("the onnx backend needs a Transformer module with a Hugging Face model")
        accepted = set(getattr(getattr(module, "tokenizer", None), "model_input_names", INPUTS))
        names = tuple(name for name in INPUTS if name in accepted or name != "token_type_ids")
        root = Path(spec.onnx_dir or Path(tempfile.gettempdir()) / "embedder-onnx")
        path = root / _cache_key(spec) / "model.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            example = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            log.info("exporting %s to ONNX at %s", spec.name, path)
            torch.onnx.export(
                _Exportable(model.float().eval(), names),
                example,
                str(partial),
                dynamo=False,
                input_names=list(names),
                output_names=["token_embeddings"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in (*names, "token_embeddings")},
                opset_version=17,
            )
            partial.replace(path)
        return cls(path, names, spec.device)

    def __call__(self, features: dict[str, Any]) -> dict[str, Any]:
        feed = {name: features[name].numpy() for name in self._names}
        (hidden,) = self._session.run(["token_embeddings"], feed)
        return {**features, "token_embeddings": torch.from_numpy(hidden)}
