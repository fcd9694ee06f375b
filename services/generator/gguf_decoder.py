"""Prompts and decode steps straight from a GGUF file's Q4_1 and Q8_0 blocks, by the C kernel in
gguf_decoder.c (compiled once per source into the cache, its ABI checked at load), for the gguf
backend's runner. Design and measurements: docs/gguf-decoder.md."""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.common.machine import cpu_flags, usable_cores

SOURCE = Path(__file__).with_suffix(".c")
# No -ffast-math: it would let the compiler reorder the sums the kernel keeps in input order.
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# The kernel is compiled once per instruction set (its DECODE_ISA says which); both compute the
# same numbers bit for bit. Per ISA: the compiler's extra flags and the /proc/cpuinfo flags needed.
ISAS = ("avx2", "avx512")
ISA_COMPILE_FLAGS = {"avx2": (), "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")}
ISA_CPU_FLAGS = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
}
LIBRARIES = ("-lmvec",)  # glibc's vector expf
# The binding's side of the ABI that abi_entry() reports; checked against the library at load.
ABI_VERSION = 4
KINDS = {"Q4_1": 0, "Q8_0": 1}
Q4_1_INT8 = 2  # Q4_1 blocks repacked for 8-bit activations (int8_layout)
Q8_0_INT8 = 3  # Q8_0 blocks repacked for 8-bit activations (q8_int8_layout)
ACTIVATIONS = ("fp32", "int8")
# Prompt tokens per kernel call: bounds the workspace (about 30 KB a token for SmolLM2-135M).
PREFILL_ROWS = 512
BLOCK, OCTET, SPAN = 32, 8, 8  # the packed layout: weights per block, rows per octet, octets per span


log = logging.getLogger(__name__)


class DecoderUnavailable(RuntimeError):
    """Why the block decoder cannot serve this model on this machine (auto then takes another backend)."""


class AbiMismatch(RuntimeError):
    """The compiled kernel and this binding disagree (a struct, a constant, a packed size): a bug
    to fix, so it stops start-up rather than falling back to another backend."""


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("n", ctypes.c_int),
        ("k", ctypes.c_int),
        ("data", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_int)
            for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab", "max_pos")
        ),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("cos_cache", ctypes.c_void_p),
        ("sin_cache", ctypes.c_void_p),
        ("embed", _Matrix),
        ("head", _Matrix),
        ("final_norm", ctypes.c_void_p),
        ("qkv", ctypes.POINTER(_Matrix)),
        ("out", ctypes.POINTER(_Matrix)),
        ("gate_up", ctypes.POINTER(_Matrix)),
        ("down", ctypes.POINTER(_Matrix)),
        ("attn_norm", ctypes.POINTER(ctypes.c_void_p)),
        ("ffn_norm", ctypes.POINTER(ctypes.c_void_p)),
    ]


def _cpu_flags() -> frozenset[str]:
    return cpu_flags()


def _compiler() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or ""


def missing_prerequisite() -> str:
    """Why the kernel cannot be built on this machine, or "" where the CPU and a compiler can."""
    missing = {"avx2", "fma"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    return "" if _compiler() else "no C compiler (cc) to build it"


def choose_isa(requested: str, cpu_flags: set[str] | None = None) -> tuple[str, str]:
    """The kernel build to load for --decode-isa `requested` (auto, avx2 or avx512) on a CPU with
    `cpu_flags` (this one's by default), and why; ValueError naming the flag where the CPU lacks
    what was asked for."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if requested not in ("auto", *ISAS):
        raise ValueError(f"--decode-isa {requested}: not one of auto, {', '.join(ISAS)}")
    if requested != "auto":
        missing = [flag for flag in ISA_CPU_FLAGS[requested] if flag not in flags]
        if missing:
            raise ValueError(f"--decode-isa {requested}: this CPU lacks {', '.join(missing)}")
        return requested, f"--decode-isa {requested}"
    missing = [flag for flag in ISA_CPU_FLAGS["avx512"] if flag not in flags]
    if not missing:
        return "avx512", "the CPU has AVX-512 with VNNI (vpdpbusd for the int8 products)"
    return "avx2", f"the CPU lacks {', '.join(missing)} for the AVX-512 build"


_INT64S = np.ctypeslib.ndpointer(np.int64, ndim=1, flags="C_CONTIGUOUS")
_FLOATS = np.ctypeslib.ndpointer(np.float32, ndim=1, flags="C_CONTIGUOUS")
_ROWS = np.ctypeslib.ndpointer(np.float32, ndim=2, flags="C_CONTIGUOUS")
_POINTERS = ctypes.POINTER(ctypes.c_void_p)
# (restype, argtypes) of every function the library exports.
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "abi_entry": (ctypes.c_char_p, [ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]),
    "matrix_bytes": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "workspace_floats": (ctypes.c_size_t, [ctypes.POINTER(_Model), ctypes.c_int]),
    "forward": (
        None,
        [
            ctypes.POINTER(_Model),
            ctypes.c_int,  # rows
            _INT64S,  # tokens
            _INT64S,  # positions
            _INT64S,  # cache_rows
            _POINTERS,  # keys, one float buffer per layer
            _POINTERS,  # values
            ctypes.c_int,  # capacity
            ctypes.c_int,  # outputs
            _INT64S,  # output_rows
            _ROWS,  # logits
            _FLOATS,  # work
            ctypes.c_int,  # threads
        ],
    ),
    "matmul_only": (None, [ctypes.POINTER(_Matrix), _ROWS, ctypes.c_int, _ROWS, ctypes.c_int]),
}


def expected_abi(isa: str = "avx2") -> dict[str, int]:
    """What the library built for `isa` must hold in its abi_entry() table for this binding: the
    constants above, the ISA, and the size and every field's offset and size of the ctypes mirrors."""
    expected = {
        "ABI_VERSION": ABI_VERSION,
        "DECODE_ISA": ISAS.index(isa),
        "BLOCK": BLOCK,
        "OCTET": OCTET,
        "SPAN": SPAN,
        "KIND_Q4_1": KINDS["Q4_1"],
        "KIND_Q8_0": KINDS["Q8_0"],
        "KIND_Q4_1_INT8": Q4_1_INT8,
        "KIND_Q8_0_INT8": Q8_0_INT8,
    }
    for name, struct in (("Matrix", _Matrix), ("Model", _Model)):
        expected[f"sizeof({name})"] = ctypes.sizeof(struct)
        for field, *_ in struct._fields_:
            descriptor = getattr(struct, field)
            expected[f"offsetof({name}, {field})"] = descriptor.offset
            expected[f"sizeof({name}.{field})"] = descriptor.size
    return expected


def library_abi(library: ctypes.CDLL) -> dict[str, int]:
    """The library's abi_entry() table."""
    entry = library.abi_entry
    entry.restype, entry.argtypes = SIGNATURES["abi_entry"]
    found: dict[str, int] = {}
    value = ctypes.c_int64()
    while (name := entry(len(found), ctypes.byref(value))) is not None:
        found[name.decode()] = value.value
    return found


def check_abi(library: ctypes.CDLL, isa: str = "avx2") -> None:
    """Raise AbiMismatch naming every entry where the library and expected_abi(isa) differ, then
    give every exported function its argtypes and restype; nothing else is called before."""
    theirs, ours = library_abi(library), expected_abi(isa)
    differences = [
        f"{name}: C {theirs.get(name, 'has none')}, Python {ours.get(name, 'has none')}"
        for name in sorted(theirs.keys() | ours.keys())
        if theirs.get(name) != ours.get(name)
    ]
    if differences:
        raise AbiMismatch(f"gguf_decoder.c and gguf_decoder.py disagree: {'; '.join(differences)}")
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            function = getattr(library, name)
        except AttributeError as error:
            raise AbiMismatch(f"gguf_decoder.c exports no {name}") from error
        function.restype, function.argtypes = restype, argtypes


def build_library(cache_dir: str, isa: str = "avx2") -> ctypes.CDLL:
    """Compile gguf_decoder.c for `isa` once into the cache (keyed by its source, compiler and
    flags), load it and check its ABI (AbiMismatch where it differs from this binding's)."""
    reason = missing_prerequisite()
    if reason:
        raise DecoderUnavailable(reason)
    compiler = _compiler()
    source = SOURCE.read_bytes()
    flags = [*COMPILE_FLAGS, *ISA_COMPILE_FLAGS[isa]]
    digest = hashlib.sha256(source + " ".join([compiler, *flags, *LIBRARIES]).encode()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / f"gguf_decoder-{isa}-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        command = [compiler, *flags, "-o", str(partial), str(SOURCE), *LIBRARIES]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise DecoderUnavailable(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        partial.rename(target)
    library = ctypes.CDLL(str(target))
    check_abi(library, isa)
    return library


def pack(kind: str, raw: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """GGUF blocks of a [rows, columns] matrix (raw bytes, one row of blocks per matrix row) in the
    kernel's layout (see gguf_decoder.c): [spans, blocks, bytes of a span block]."""
    if kind not in KINDS:
        raise DecoderUnavailable(f"weights of type {kind}")
    blocks = columns // BLOCK
    raw = raw.reshape(rows, blocks, 20 if kind == "Q4_1" else 34)
    floats = [raw[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]]  # scales [rows, blocks]
    if kind == "Q4_1":
        floats.append(raw[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0])  # minimums
        q = np.concatenate([raw[..., 4:20] & 15, raw[..., 4:20] >> 4], axis=-1)  # [rows, blocks, 32]
    else:
        q = raw[..., 2:34]
    # [spans, octets, 8 rows, blocks, 16 pairs, 2] -> [spans, blocks, pairs, octets, 2, 8 rows]
    q = q.reshape(-1, SPAN, OCTET, blocks, BLOCK // 2, 2).transpose(0, 3, 4, 1, 5, 2)
    values = q[..., 0, :] | (q[..., 1, :] << 4) if kind == "Q4_1" else q
    spans = rows // (SPAN * OCTET)
    parts = [np.ascontiguousarray(values).reshape(spans, blocks, -1)]
    for per_row in floats:  # [rows, blocks] -> [spans, blocks, octets, 8 rows]
        grouped = per_row.reshape(spans, SPAN, OCTET, blocks).transpose(0, 3, 1, 2)
        parts.append(np.ascontiguousarray(grouped).view(np.uint8).reshape(spans, blocks, -1))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1))


def int8_layout(packed: np.ndarray) -> np.ndarray:
    """A Q4_1 matrix in pack()'s layout repacked for 8-bit activations (see gguf_decoder.c):
    [octets, blocks, 192-byte record]."""
    spans, blocks = packed.shape[:2]
    values = packed[..., :1024].reshape(spans, blocks, BLOCK // 2, SPAN, OCTET)
    # [spans, blocks, pairs, octets, lanes, 2] -> [octets, blocks, lanes, 32 inputs]
    q = np.stack([values & 15, values >> 4], axis=-1).transpose(0, 3, 1, 4, 2, 5)
    q = q.reshape(spans * SPAN, blocks, OCTET, 4, 2, 4)  # inputs 8h + 4i + j
    nibbles = (q[..., 0, :] | (q[..., 1, :] << 4)).transpose(0, 1, 3, 2, 4)  # [octets, blocks, h, lanes, j]
    floats = [
        packed[..., at : at + 256].reshape(spans, blocks, SPAN, OCTET * 4).transpose(0, 2, 1, 3)
        for at in (1024, 1280)
    ]  # scales, minimums: [spans, octets, blocks, 8 lanes' float bytes]
    parts = [nibbles.reshape(spans * SPAN, blocks, 128)] + [
        f.reshape(spans * SPAN, blocks, 32) for f in floats
    ]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1))


def q8_int8_layout(packed: np.ndarray) -> np.ndarray:
    """A Q8_0 matrix in pack()'s layout repacked for 8-bit activations (see gguf_decoder.c):
    [octets, blocks, 288-byte record]."""
    spans, blocks = packed.shape[:2]
    values = packed[..., :2048].reshape(spans, blocks, BLOCK // 2, SPAN, 2, OCTET)
    # [spans, blocks, pairs, octets, 2, lanes] -> [octets, blocks, h, lanes, j] for input 4h + j
    q = values.transpose(0, 3, 1, 2, 4, 5).reshape(spans * SPAN, blocks, 8, 4, OCTET).transpose(0, 1, 2, 4, 3)
    scales = packed[..., 2048:2304].reshape(spans, blocks, SPAN, OCTET * 4).transpose(0, 2, 1, 3)
    parts = [q.reshape(spans * SPAN, blocks, 256), scales.reshape(spans * SPAN, blocks, 32)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1))


INT8_LAYOUTS = {KINDS["Q4_1"]: (int8_layout, Q4_1_INT8), KINDS["Q8_0"]: (q8_int8_layout, Q8_0_INT8)}


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Order of the GGUF rows of a query or key projection in the Hugging Face layout: the GGUF
    converter interleaves each head's two rotary halves (llama.cpp rotates adjacent pairs)."""
    permuted = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    order = np.empty(rows, np.int64)
    order[permuted] = np.arange(rows)
    return order


def refusal(gguf_path: Path, hf_config: dict[str, Any], cache_dir: str) -> str:
    """Why the decoder would refuse this model, from its config and GGUF header alone, or "" (what
    `--backend auto` checks before exporting the ONNX model); a file whose blocks are cached passes
    without its header read again (seconds to parse: the vocabulary)."""
    from gguf import GGUFReader

    try:
        check_config(hf_config)
        if _blocks_path(gguf_path, cache_dir).is_file():
            return ""
        tensors = GGUFReader(str(gguf_path)).tensors
    except (DecoderUnavailable, KeyError, OSError, ValueError) as error:
        return str(error) or type(error).__name__
    return _unfit_tensors(tensors)


def _unfit_tensors(tensors: list[Any]) -> str:
    """Why the kernel cannot take a GGUF file's tensors (names, types and shapes), or ""."""
    if any(t.name == "output.weight" for t in tensors):
        return "an output head apart from the token embeddings"
    for tensor in tensors:
        kind = tensor.tensor_type.name
        if tensor.name.endswith("norm.weight"):
            if kind != "F32":
                return f"{tensor.name} is not an F32 vector"
            continue
        shape = [int(x) for x in tensor.shape]
        if kind not in KINDS or len(shape) != 2 or shape[1] % (SPAN * OCTET) or shape[0] % BLOCK:
            return f"{tensor.name} is {kind} {shape[::-1]}"
    return ""


def check_config(hf_config: dict[str, Any]) -> None:
    """Refuse a model the kernel does not compute: another architecture, scaled rotary
    embeddings, sizes that are not multiples of 8 or heads that do not tile the hidden size."""
    if hf_config.get("architectures") != ["LlamaForCausalLM"]:
        raise DecoderUnavailable(f"the architecture is {hf_config.get('architectures')}, not Llama")
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise DecoderUnavailable(f"the model scales its rotary embeddings ({rope})")
    hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    if hidden % 8 or head_dim % 8 or int(hf_config["intermediate_size"]) % 8:
        raise DecoderUnavailable("hidden, head and intermediate sizes must be multiples of 8")
    if heads * head_dim != hidden:
        raise DecoderUnavailable(f"{heads} heads of {head_dim} do not make the hidden size {hidden}")


def read_blocks(gguf_path: Path, layers: int, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    """Every matrix of the model packed for the kernel (with its kind, rows and columns under
    `shape.NAME`), and the norm weights; named qkv.L, out.L, gate_up.L, down.L, attn_norm.L,
    ffn_norm.L, embed, final_norm."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    unfit = _unfit_tensors(list(tensors.values()))
    if unfit:
        raise DecoderUnavailable(unfit)
    found: dict[str, np.ndarray] = {}

    def raw(name: str) -> tuple[str, np.ndarray, int, int]:
        tensor = tensors.get(name)
        if tensor is None:
            raise DecoderUnavailable(f"no tensor {name} in {gguf_path.name}")
        columns, rows = (int(x) for x in tensor.shape[:2])
        return tensor.tensor_type.name, np.asarray(tensor.data).reshape(rows, -1), rows, columns

    def matrix(key: str, *names: str, heads_of: tuple[int, ...] = ()) -> None:
        parts = [raw(name) for name in names]
        if len({p[0] for p in parts}) != 1 or len({p[3] for p in parts}) != 1:
            raise DecoderUnavailable(f"{', '.join(names)} mix block types or widths")
        blocks = [
            data[unpermute_rows(rows, heads_of[i])] if i < len(heads_of) else data
            for i, (_, data, rows, _) in enumerate(parts)
        ]
        kind, rows, columns = parts[0][0], sum(p[2] for p in parts), parts[0][3]
        found[key] = pack(kind, np.concatenate(blocks), rows, columns)
        found[f"shape.{key}"] = np.asarray([KINDS[kind], rows, columns], np.int64)

    def vector(key: str, name: str) -> None:
        tensor = tensors.get(name)
        if tensor is None:
            raise DecoderUnavailable(f"no tensor {name} in {gguf_path.name}")
        found[key] = np.ascontiguousarray(np.asarray(tensor.data, dtype=np.float32))

    for layer in range(layers):
        blk = f"blk.{layer}."
        matrix(f"qkv.{layer}", *(blk + f"attn_{x}.weight" for x in "qkv"), heads_of=(heads, kv_heads))
        matrix(f"out.{layer}", blk + "attn_output.weight")
        matrix(f"gate_up.{layer}", blk + "ffn_gate.weight", blk + "ffn_up.weight")
        matrix(f"down.{layer}", blk + "ffn_down.weight")
        vector(f"attn_norm.{layer}", blk + "attn_norm.weight")
        vector(f"ffn_norm.{layer}", blk + "ffn_norm.weight")
    matrix("embed", "token_embd.weight")
    vector("final_norm", "output_norm.weight")
    return found


def _packing_digest() -> str:
    """A digest of the code and constants that produce read_blocks()' arrays, so that a cached copy
    packed by other code is never read (no version to bump by hand)."""
    code = "".join(inspect.getsource(f) for f in (pack, unpermute_rows, read_blocks, _unfit_tensors))
    constants = repr((ABI_VERSION, BLOCK, OCTET, SPAN, sorted(KINDS.items())))
    return hashlib.sha256((code + constants).encode()).hexdigest()[:12]


def _blocks_path(gguf_path: Path, cache_dir: str) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_packing_digest()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"gguf-blocks-{gguf_path.stem}-{digest}.npz"


def cached_blocks(
    gguf_path: Path, cache_dir: str, layers: int, heads: int, kv_heads: int
) -> dict[str, np.ndarray]:
    """read_blocks(), saved once into the cache: reading a GGUF's metadata takes seconds (its
    vocabulary), loading the packed copy a fraction of one."""
    target = _blocks_path(gguf_path, cache_dir)
    if target.is_file():
        with np.load(target) as saved:
            return {name: saved[name] for name in saved.files}
    blocks = read_blocks(gguf_path, layers, heads, kv_heads)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.stem + f".partial-{os.getpid()}.npz")
    arrays: dict[str, Any] = blocks  # savez's keywords are typed as its own options
    np.savez(partial, **arrays)
    partial.rename(target)
    return blocks


class GgufDecoder:
    """Prompts and decode steps of one GGUF Llama model, writing into the gguf backend's KV buffers."""

    def __init__(
        self,
        gguf_path: Path,
        hf_config: dict[str, Any],
        rotary: tuple[np.ndarray, np.ndarray],
        cache_dir: str,
        threads: int,
        activations: str = "fp32",
        isa: str = "auto",
    ) -> None:
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
        self.isa, reason = choose_isa(isa)
        check_config(hf_config)
        hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
        kv_heads = int(hf_config.get("num_key_value_heads") or heads)
        head_dim = int(hf_config.get("head_dim") or hidden // heads)
        layers, inter = int(hf_config["num_hidden_layers"]), int(hf_config["intermediate_size"])
        self.library = build_library(cache_dir, self.isa)
        log.info("GGUF block decoder on %s: %s", self.isa, reason)
        # The OpenMP regions take this count explicitly (num_threads), whatever OMP_NUM_THREADS says.
        self.threads = threads or usable_cores().count
        self.blocks = cached_blocks(gguf_path, cache_dir, layers, heads, kv_heads)
        # What decode steps multiply: with int8 activations, every matrix repacked for them (the
        # output head as "head"; the token embeddings are read from the fp32 layout). Prompts
        # always take the fp32 blocks (why: docs/gguf-decoder.md).
        self.decode_blocks = dict(self.blocks)
        self.activations = activations
        if activations == "int8":
            matrices = [f"{name}.{i}" for name in ("qkv", "out", "gate_up", "down") for i in range(layers)]
            for target, source in [*((key, key) for key in matrices), ("head", "embed")]:
                repack, kind = INT8_LAYOUTS[int(self.blocks[f"shape.{source}"][0])]
                self.decode_blocks[target] = repack(self.blocks[source])
                self.decode_blocks[f"shape.{target}"] = self.blocks[f"shape.{source}"].copy()
                self.decode_blocks[f"shape.{target}"][0] = kind
        cosines, sines = (np.ascontiguousarray(a, dtype=np.float32) for a in rotary)
        self._rotary = (cosines, sines)  # the model structs point into them
        self._tables: list[Any] = []  # and into these

        vocab = int(self.blocks["shape.embed"][1])
        shapes = {  # [rows, columns] the config makes each matrix, by name
            "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
            "out": (hidden, hidden),
            "gate_up": (2 * inter, hidden),
            "down": (hidden, inter),
            "embed": (vocab, hidden),
            "head": (vocab, hidden),
        }
        vectors = [self.blocks[f"{name}.{i}"] for name in ("attn_norm", "ffn_norm") for i in range(layers)]
        for vector in [*vectors, self.blocks["final_norm"]]:
            if vector.dtype != np.float32 or vector.shape != (hidden,):
                raise DecoderUnavailable(f"a norm weight of shape {vector.shape}, not ({hidden},)")
        if cosines.shape != sines.shape or cosines.ndim != 2 or cosines.shape[1] != head_dim // 2:
            raise DecoderUnavailable(
                f"rotary tables of shape {cosines.shape}, not [positions, {head_dim // 2}]"
            )

        def matrix_of(blocks: dict[str, np.ndarray], key: str) -> _Matrix:
            """The struct of one packed matrix, once its shape matches the config's and its bytes
            the kernel's reading of them."""
            kind, rows, columns = (int(x) for x in blocks[f"shape.{key}"])
            if (rows, columns) != shapes[key.split(".")[0]]:
                raise DecoderUnavailable(
                    f"{key} is [{rows}, {columns}], the config makes it {shapes[key.split('.')[0]]}"
                )
            data = blocks[key]
            reads = int(self.library.matrix_bytes(kind, rows, columns))
            if not reads or data.nbytes != reads or data.dtype != np.uint8 or not data.flags.c_contiguous:
                raise AbiMismatch(
                    f"{key} is packed in {data.nbytes} bytes (kind {kind}), the kernel reads {reads}"
                )
            return _Matrix(kind, rows, columns, data.ctypes.data)

        def model_of(blocks: dict[str, np.ndarray]) -> _Model:
            tables = [
                (_Matrix * layers)(*(matrix_of(blocks, f"{name}.{i}") for i in range(layers)))
                for name in ("qkv", "out", "gate_up", "down")
            ] + [
                (ctypes.c_void_p * layers)(*(blocks[f"{name}.{i}"].ctypes.data for i in range(layers)))
                for name in ("attn_norm", "ffn_norm")
            ]
            self._tables += tables
            embed = matrix_of(blocks, "embed")
            head = matrix_of(blocks, "head") if "head" in blocks else embed
            return _Model(
                layers,
                hidden,
                heads,
                kv_heads,
                head_dim,
                inter,
                embed.n,
                int(cosines.shape[0]),
                float(hf_config.get("rms_norm_eps", 1e-6)),
                head_dim**-0.5,
                cosines.ctypes.data,
                sines.ctypes.data,
                embed,
                head,
                blocks["final_norm"].ctypes.data,
                *tables,
            )

        self.prompt_model = model_of(self.blocks)
        self.model = model_of(self.decode_blocks) if activations == "int8" else self.prompt_model
        # The decode steps' kernel alone, for tests and benchmarks.
        self.matrix: Callable[[str], _Matrix] = lambda key: matrix_of(self.decode_blocks, key)
        self.vocab = vocab
        self._work = np.zeros(0, np.float32)

    def forward(
        self,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        cache_rows: np.ndarray,
        positions: np.ndarray,
        tokens: np.ndarray,
        output_rows: np.ndarray,
        model: _Model,
    ) -> np.ndarray:
        """Token r at positions[r] of cache row cache_rows[r], its keys and values written there;
        the logits [len(output_rows), vocab] of the rows listed (see forward() in the C source)."""
        if len(keys) != model.layers or len(values) != model.layers or keys[0].ndim != 4:
            raise ValueError(
                f"{model.layers} key and value buffers [rows, kv_heads, capacity, head_dim] expected, "
                f"{len(keys)} and {len(values)} given"
            )
        rows, capacity = len(tokens), int(keys[0].shape[2])
        shape = (keys[0].shape[0], model.kv_heads, capacity, model.head_dim)
        if any(
            a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous for a in (*keys, *values)
        ):
            raise ValueError(f"the key and value buffers must all be contiguous float32 {list(shape)}")
        tokens, positions, cache_rows, output_rows = (
            np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
            for a in (tokens, positions, cache_rows, output_rows)
        )
        if len(positions) != rows or len(cache_rows) != rows:
            raise ValueError(f"{rows} tokens, {len(positions)} positions and {len(cache_rows)} cache rows")
        for name, indices, bound in (
            ("position", positions, min(capacity, model.max_pos)),
            ("cache row", cache_rows, shape[0]),
            ("token id", tokens, self.vocab),
            ("output row", output_rows, rows),
        ):
            if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= bound):
                raise ValueError(f"a {name} outside [0, {bound})")
        needed = self.library.workspace_floats(ctypes.byref(model), rows)
        if self._work.size < needed:
            self._work = np.zeros(needed, np.float32)
        logits = np.empty((len(output_rows), self.vocab), np.float32)
        key_pointers = (ctypes.c_void_p * len(keys))(*(k.ctypes.data for k in keys))
        value_pointers = (ctypes.c_void_p * len(values))(*(v.ctypes.data for v in values))
        self.library.forward(
            ctypes.byref(model),
            rows,
            tokens,
            positions,
            cache_rows,
            key_pointers,
            value_pointers,
            capacity,
            len(output_rows),
            output_rows,
            logits,
            self._work,
            self.threads,
        )
        return logits

    def decode(
        self, keys: list[np.ndarray], values: list[np.ndarray], lengths: np.ndarray, tokens: np.ndarray
    ) -> np.ndarray:
        """Next logits [rows, vocab] after appending `tokens` at `lengths` in each row's cache."""
        every = np.arange(len(lengths))
        return self.forward(keys, values, every, lengths, tokens, every, self.model)

    def prefill(
        self, keys: list[np.ndarray], values: list[np.ndarray], prompts: list[tuple[int, int, list[int]]]
    ) -> np.ndarray:
        """Each (cache row, start, tokens) appends its tokens from position `start` of its cache
        row; the logits [prompts, vocab] after each prompt's last token. PREFILL_ROWS tokens at a
        time, in order, so that a later piece attends to the keys and values an earlier one wrote."""
        if not all(tokens for _, _, tokens in prompts):
            raise ValueError("a prompt with no token to compute")
        rows = [(row, start + i, token) for row, start, tokens in prompts for i, token in enumerate(tokens)]
        last = set(np.cumsum([len(tokens) for _, _, tokens in prompts]) - 1)
        pieces = []
        for at in range(0, len(rows), PREFILL_ROWS):
            piece = np.asarray(rows[at : at + PREFILL_ROWS], np.int64).reshape(-1, 3)
            outputs = np.asarray([i for i in range(len(piece)) if at + i in last], np.int64)
            pieces.append(
                self.forward(keys, values, piece[:, 0], piece[:, 1], piece[:, 2], outputs, self.prompt_model)
            )
        return np.concatenate(pieces)

    def matmul(self, key: str, x: np.ndarray) -> np.ndarray:
        """x [rows, k] . W^T for one packed matrix (say "gate_up.3"), with the kernel alone."""
        matrix = self.matrix(key)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != matrix.k:
            raise ValueError(f"x is {list(x.shape)}, not [rows, {matrix.k}]")
        rows = x.shape[0]
        y = np.empty((rows, matrix.n), np.float32)
        self.library.matmul_only(ctypes.byref(matrix), x, rows, y, self.threads)
        return y
