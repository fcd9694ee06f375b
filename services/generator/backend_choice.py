"""Which runtime serves the model: one pure function of the model's and the platform's traits and
the flags, returning the backend and the reason (or refusing, naming the flag); docs/backends.md
has its table. The traits are gathered apart, by `model_traits` and `platform_traits`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from services.common.machine import cpu_flags

Backend = Literal["torch", "onnx", "gguf"]

# The architectures whose onnxruntime-genai export the ONNX runner is tested with; an explicit
# `--backend onnx` tries any other one the exporter knows.
ONNX_AUTO_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
ONNX_PACKAGES = ("onnxruntime", "onnxruntime_genai")


class ModelLoadError(RuntimeError):
    """The configuration asks for something this platform or model cannot do."""


@dataclass(frozen=True)
class ModelTraits:
    gguf: bool  # the weights come from a GGUF file
    architectures: tuple[str, ...]  # from the Hugging Face config
    gguf_refusal: str = ""  # why the GGUF block decoder cannot take this model, or ""


@dataclass(frozen=True)
class PlatformTraits:
    cuda: bool  # a CUDA device is available
    fast_bf16: bool  # the CPU has AVX-512 BF16 or AMX
    decoder_missing: str = ""  # what the GGUF block decoder lacks to build here, or ""
    onnx_missing: str = ""  # the first ONNX Runtime package not installed, or ""
    bitsandbytes: bool = True  # installed
    flash_attn: bool = False  # installed


@dataclass(frozen=True)
class BackendFlags:
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    attn_implementation: str = "sdpa"
    onnx_precision: str = "fp32"
    gguf_activations: str = "auto"


@dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str
    fallbacks: tuple[Backend, ...] = ()  # what auto loads, in turn, if this backend fails to load


def _torch_only(flags: BackendFlags) -> str:
    """The first flag that only the torch backend takes, as the user wrote it, or ""."""
    if flags.device.startswith("cuda"):
        return f"--device {flags.device}"
    if flags.quantization != "none":
        return f"--quantization {flags.quantization}"
    if flags.attn_implementation != "sdpa":
        return f"--attn-implementation {flags.attn_implementation}"
    if flags.dtype in ("bfloat16", "float16"):
        return f"--dtype {flags.dtype}"
    return ""


def _own_flags(flags: BackendFlags) -> dict[Backend, str]:
    """Each backend named by a flag only it takes, with that flag."""
    own: dict[Backend, str] = {}
    if torch_flag := _torch_only(flags):
        own["torch"] = torch_flag
    if flags.onnx_precision != "fp32":
        own["onnx"] = f"--onnx-precision {flags.onnx_precision}"
    if flags.gguf_activations != "auto":
        own["gguf"] = f"--gguf-activations {flags.gguf_activations}"
    return own


def _refuse_for_cpu_runtime(name: str, flags: BackendFlags) -> None:
    """The refusals --backend onnx and --backend gguf share: both run on the CPU in fp32."""
    if flags.device.startswith("cuda"):
        raise ModelLoadError(
            f"--backend {name} runs on the CPU only; use --backend torch for --device {flags.device}"
        )
    if flags.quantization != "none":
        raise ModelLoadError(
            f"--quantization {flags.quantization} is bitsandbytes, for --backend torch; --backend onnx "
            "quantizes with --onnx-precision"
            + ("" if name == "onnx" else ", --backend gguf serves the GGUF file's own blocks")
        )
    if flags.attn_implementation != "sdpa":
        raise ModelLoadError(f"--attn-implementation {flags.attn_implementation} is for --backend torch")
    if flags.dtype in ("bfloat16", "float16"):
        raise ModelLoadError(
            f"--dtype {flags.dtype} is for --backend torch; --backend {name} computes in fp32"
        )


def _check_explicit(backend: str, model: ModelTraits, platform: PlatformTraits, flags: BackendFlags) -> None:
    """Refuse `backend` where it cannot serve with these flags."""
    if backend != "torch":
        _refuse_for_cpu_runtime(backend, flags)
    for other, flag in _own_flags(flags).items():
        if other != backend:
            raise ModelLoadError(f"{flag} is for --backend {other}, not --backend {backend}")
    if backend == "torch":
        return
    if backend == "onnx" and platform.onnx_missing:
        raise ModelLoadError(
            f"--backend onnx needs {platform.onnx_missing}, which is not installed; use --backend torch"
        )
    if backend != "gguf":
        return
    if not model.gguf:
        raise ModelLoadError(
            "--backend gguf serves a GGUF file (--model FILE.gguf, --gguf-file, or the packaged model); "
            "use --backend onnx or torch for this model"
        )
    if model.gguf_refusal:
        raise ModelLoadError(f"--backend gguf cannot take this model: {model.gguf_refusal}")
    if platform.decoder_missing:
        raise ModelLoadError(f"--backend gguf cannot be built here: {platform.decoder_missing}")


def _check_platform(platform: PlatformTraits, flags: BackendFlags) -> None:
    """Refusals whatever the backend: a device, package or kernel this machine lacks."""
    if flags.device.startswith("cuda") and not platform.cuda:
        raise ModelLoadError(
            f"--device {flags.device}: CUDA is not available on this machine; use --device cpu"
        )
    if flags.attn_implementation == "flash_attention_2":
        if not (platform.cuda and flags.device != "cpu"):
            raise ModelLoadError(
                "--attn-implementation flash_attention_2 needs a CUDA GPU; use sdpa (the default) on CPU"
            )
        if not platform.flash_attn:
            raise ModelLoadError(
                "--attn-implementation flash_attention_2 needs the flash-attn package; install it or use sdpa"
            )
    if flags.quantization != "none" and not platform.bitsandbytes:
        raise ModelLoadError(
            f"--quantization {flags.quantization} needs bitsandbytes, which is not installed: "
            "pip install 'bitsandbytes>=0.50,<0.51', or use --quantization none "
            "(on a CPU, --dtype bfloat16 is the fast choice)"
        )


def choose_backend(model: ModelTraits, platform: PlatformTraits, flags: BackendFlags) -> Choice:
    """The backend that serves `model` here with `flags`, why, and what `auto` falls back to if it
    fails to load; raises ModelLoadError naming the flag where an explicit choice (or a flag only
    one backend takes) cannot work."""
    if flags.backend != "auto":
        _check_explicit(flags.backend, model, platform, flags)
        _check_platform(platform, flags)
        return Choice(_backend(flags.backend), f"--backend {flags.backend}")
    own = _own_flags(flags)
    if len(own) > 1:
        raise ModelLoadError(f"{' and '.join(own.values())} are for different backends; drop one")
    if own:
        ((backend, flag),) = own.items()
        try:
            _check_explicit(backend, model, platform, flags)
        except ModelLoadError as error:
            raise ModelLoadError(f"{flag} asks for --backend {backend}: {error}") from error
        _check_platform(platform, flags)
        return Choice(backend, f"{flag} is this backend's option")
    _check_platform(platform, flags)
    if platform.cuda and flags.device == "auto":
        return Choice("torch", "CUDA is available")
    if model.gguf and not model.gguf_refusal and not platform.decoder_missing:
        # Where the decoder then fails to load, auto serves as if it had refused the model.
        instead = choose_backend(replace(model, gguf_refusal="it failed to load"), platform, flags)
        fallbacks = (instead.backend, *instead.fallbacks)
        return Choice("gguf", "a GGUF Llama model the block decoder takes, on a CPU", fallbacks)
    note = f" (the block decoder: {model.gguf_refusal or platform.decoder_missing})" if model.gguf else ""
    if platform.fast_bf16 and flags.dtype == "auto":
        return Choice("torch", f"this CPU computes bf16 fast{note}")
    if platform.onnx_missing:
        return Choice("torch", f"{platform.onnx_missing} is not installed{note}")
    if not set(model.architectures) & ONNX_AUTO_ARCHITECTURES:
        names = ", ".join(model.architectures) or "unknown"
        return Choice("torch", f"onnx is not tested with the architecture {names}{note}")
    return Choice("onnx", f"a CPU, fp32 and a tested architecture{note}", ("torch",))


def _backend(name: str) -> Backend:
    if name not in ("torch", "onnx", "gguf"):
        raise ModelLoadError(f"--backend {name}: not one of auto, torch, onnx, gguf")
    return name  # type: ignore[return-value]


def model_traits(config: dict[str, Any], gguf_path: Path | None, cache_dir: str) -> ModelTraits:
    """A model's traits from its Hugging Face config and GGUF file (only the header is read)."""
    from services.generator.gguf_decoder import refusal

    return ModelTraits(
        gguf=gguf_path is not None,
        architectures=tuple(config.get("architectures") or ()),
        gguf_refusal=refusal(gguf_path, config, cache_dir) if gguf_path is not None else "",
    )


def platform_traits() -> PlatformTraits:
    """This machine's traits: CUDA, fast bf16, what the block decoder lacks, installed packages."""
    import torch

    from services.generator.gguf_decoder import missing_prerequisite

    def installed(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    return PlatformTraits(
        cuda=torch.cuda.is_available(),
        fast_bf16=cpu_has_fast_bf16(),
        decoder_missing=missing_prerequisite(),
        onnx_missing=next((name for name in ONNX_PACKAGES if not installed(name)), ""),
        bitsandbytes=installed("bitsandbytes"),
        flash_attn=installed("flash_attn"),
    )


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX make bf16 matmuls faster than fp32; without them bf16 is emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
