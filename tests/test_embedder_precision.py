"""The embedder's precision: the default path and every path this CPU offers keep cosine >= 0.999 to
in-process torch fp32 over 500 varied texts; the choice is logged with its reason; bf16 where it cannot
run fails at start naming the flag."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from inference.v1 import embedding_pb2_grpc

from services.embedder.batcher import DynamicBatcher
from services.embedder.exceptions import ModelUnavailable
from services.embedder.models import PROBE_SHORT_TOKENS, EmbeddingModel
from services.embedder.precision import (
    PROBE_TEXTS,
    CpuTraits,
    PrecisionError,
    choose_precision,
    cpu_traits,
)
from services.embedder.spec import ModelSpec
from tests.embedder_texts import varied_texts
from tests.fixtures_embedder import default_embedding_folder, embed_request, start_embedder

MIN_COSINE = 0.999
TEXTS = varied_texts(500)
FAST_BF16 = cpu_traits().fast_bf16

# The default (auto) path, and each path auto does not take that this CPU can run.
PATHS: dict[str, tuple[str, ...]] = {
    "default": ("--precision", "auto"),
    "fp32": ("--precision", "fp32"),
    "onnx": ("--backend", "onnx", "--precision", "auto"),
}
if not FAST_BF16:
    PATHS.pop("fp32")  # there auto is fp32 already


@pytest.fixture(scope="module")
def fp32_reference(embedding_reference_model: Any) -> np.ndarray:
    vectors: np.ndarray = embedding_reference_model.encode(
        TEXTS, batch_size=64, convert_to_numpy=True, normalize_embeddings=True
    )
    return vectors


def test_texts_are_varied_and_deterministic(embedding_reference_model: Any) -> None:
    assert varied_texts(500) == TEXTS and len(set(TEXTS)) > 400
    lengths = [len(ids) for ids in embedding_reference_model.tokenizer(TEXTS)["input_ids"]]
    assert min(lengths) <= 4 and max(lengths) > embedding_reference_model.max_seq_length
    joined = "".join(TEXTS)
    for sample in ("机器", "Москва", "القاهرة", "東京", "def ", "SELECT", "🚀", "\t", "\u3000"):
        assert sample in joined, sample


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_served_vectors_keep_cosine_to_fp32(path: str, fp32_reference: np.ndarray) -> None:
    handle = start_embedder("--max-inputs-per-request", "512", *PATHS[path])
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            reply = await stub.Embed(embed_request(TEXTS, truncate=True), timeout=300)
        log = handle.process.log_path.read_text(errors="replace")
    finally:
        handle.process.stop()
    served = np.array([list(item.embedding) for item in reply.data], dtype=np.float32)
    cosines = (served * fp32_reference).sum(axis=1)
    assert cosines.min() >= MIN_COSINE, (path, float(cosines.min()), TEXTS[int(cosines.argmin())])
    if path == "default" and FAST_BF16:
        assert "precision bf16: CPU has" in log and "cosine to fp32 0.99" in log, log
    elif path == "default" or path == "fp32":
        assert "precision fp32:" in log, log
    else:
        assert "precision fp32: --backend onnx computes in fp32" in log, log


def test_bf16_with_onnx_fails_at_start_naming_the_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.embedder", "--precision", "bf16", "--backend", "onnx"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--precision bf16 runs on --backend torch" in done.stderr, done.stderr


def test_the_choice_follows_the_cpu_and_the_flags() -> None:
    amx = CpuTraits(avx512_bf16=True, amx_bf16=True)
    plain = CpuTraits(avx512_bf16=False, amx_bf16=False)
    chosen = choose_precision("auto", "cpu", "torch", "float32", amx)
    assert (chosen.precision, chosen.verify) == ("bf16", True)
    assert chosen.reason == "CPU has AMX and AVX512-BF16"
    assert choose_precision("auto", "cpu", "torch", "float32", plain).precision == "fp32"
    assert choose_precision("auto", "cuda", "torch", "float32", amx).precision == "fp32"
    assert choose_precision("auto", "cpu", "onnx", "float32", amx).precision == "fp32"
    assert choose_precision("auto", "cpu", "torch", "bfloat16", amx).precision == "fp32"
    assert choose_precision("fp32", "cpu", "torch", "float32", amx).precision == "fp32"
    forced = choose_precision("bf16", "cpu", "torch", "float32", CpuTraits(True, False))
    assert (forced.precision, forced.verify) == ("bf16", False)
    refusals = {
        "AVX512-BF16 or AMX": ("cpu", "torch", "float32", plain),
        "--backend onnx computes in fp32": ("cpu", "onnx", "float32", amx),
        "drop --dtype bfloat16": ("cpu", "torch", "bfloat16", amx),
        "on cuda use --dtype bfloat16": ("cuda", "torch", "float32", amx),
    }
    for message, (device, backend, dtype, cpu) in refusals.items():
        with pytest.raises(PrecisionError, match="--precision bf16") as raised:
            choose_precision("bf16", device, backend, dtype, cpu)
        assert message in str(raised.value)


class _NanInBf16(EmbeddingModel):
    """The real model, except that its bf16 forward passes come out NaN (a broken bf16 kernel)."""

    def _forward(self, batch: Sequence[Sequence[int]], bf16: bool) -> npt.NDArray[np.float32]:
        vectors = super()._forward(batch, bf16)
        return np.full_like(vectors, np.nan) if bf16 else vectors


def _spec(verify: bool) -> ModelSpec:
    folder = str(default_embedding_folder())
    return ModelSpec("probe", folder, "cpu", "float32", precision="bf16", verify_precision=verify)


class _Recording(EmbeddingModel):
    """The real model, noting each forward pass's thread and sequence lengths."""

    seen: ClassVar[list[tuple[str, list[int]]]] = []

    def _forward(self, batch: Sequence[Sequence[int]], bf16: bool) -> npt.NDArray[np.float32]:
        self.seen.append((threading.current_thread().name, [len(ids) for ids in batch]))
        return super()._forward(batch, bf16)


def test_probe_runs_on_the_model_thread_with_the_long_text_alone(embedding_reference_model: Any) -> None:
    batcher = DynamicBatcher(max_batch_size=8, max_batch_tokens=4096, max_wait_s=0.0)
    _Recording.seen.clear()
    try:
        model = _Recording(_spec(True), embedding_reference_model, batcher.run_on_model_thread)
    finally:
        batcher._executor.shutdown(wait=True)
    seen = _Recording.seen
    assert model.probe_cosine is not None and model.probe_cosine >= MIN_COSINE
    assert model.precision == "bf16" and model.served_dtype == "float32 (bf16 autocast)"
    assert {name.split("_")[0] for name, _ in seen} == {"embedder-model"}, seen
    assert sum(len(lengths) for _, lengths in seen) == 2 * len(PROBE_TEXTS)
    assert any(len(lengths) == 1 and lengths[0] > PROBE_SHORT_TOKENS for _, lengths in seen), seen
    for _, lengths in seen:
        assert len(lengths) == 1 or max(lengths) <= PROBE_SHORT_TOKENS, seen


def test_explicit_bf16_is_not_probed_and_refuses_non_finite_vectors(
    embedding_reference_model: Any,
) -> None:
    model = _NanInBf16(_spec(False), embedding_reference_model)
    assert model.probe_cosine is None and model.precision == "bf16"
    with pytest.raises(ModelUnavailable, match="non-finite vectors in bf16; serve it with --precision fp32"):
        model.embed(model.tokenize(["hello"]))


def test_auto_serves_fp32_where_the_probe_is_non_finite_or_fails(embedding_reference_model: Any) -> None:
    nan = _NanInBf16(_spec(True), embedding_reference_model)
    assert nan.precision == "fp32" and nan.served_dtype == "float32"
    assert np.isfinite(nan.embed(nan.tokenize(["hello"]))).all()

    def broken(forward: Any) -> npt.NDArray[np.float32]:
        raise RuntimeError("no model thread")

    failed = EmbeddingModel(_spec(True), embedding_reference_model, broken)
    assert failed.precision == "fp32" and failed.probe_cosine is None
    assert failed.probe_failure is not None and "RuntimeError: no model thread" in failed.probe_failure
