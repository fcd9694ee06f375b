"""The onnx backend: the model exported once by onnxruntime-genai's builder (fp32 MatMul, or
int8/int4 MatMulNBits) and run by ONNX Runtime on a CPU, into the shared KV buffers (kv_cache.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.generator.kv_cache import HEADROOM, KvBatch, KvCacheRunner
from services.generator.runner import ModelFacts

log = logging.getLogger(__name__)

# MLAS computes a one-row int8/int4 matmul (MatMulNBits) with another kernel than a many-row one,
# and the logits differ (by up to 0.5 here); with those weights a lone decoding row is paired with
# a scratch row so that a sequence gets the same numbers, and a seeded request the same text, alone
# or inside a batch. fp32 matmuls give every row the same numbers at any row count (checked: 0.0
# difference), and a lone row decodes about 5% faster without the scratch row.
MIN_DECODE_ROWS = {"fp32": 1, "int8": 2, "int4": 2}
# A prompt continuing a cached prefix computes two tokens at least: one token would take the
# attention op's decode path (and int8's one-row kernel), whose logits differ from a full prefill's
# (by 3e-5 at fp32, 0.7 at int8); from two tokens on they are identical.
PREFIX_FRESH_TOKENS = 2


# Logits of a prompt's last position only: the runner reads no other, and the head over every
# position cost a quarter of a prefill here.
BUILD_OPTIONS = ("prune_lm_head=true",)


class OnnxBuildError(RuntimeError):
    pass


def build_onnx_model(hf_folder: Path, precision: str, cache_dir: str) -> Path:
    """Export a Hugging Face model folder once with onnxruntime-genai's builder; reuse it after."""
    weights = sorted(hf_folder.glob("*.safetensors")) or sorted(hf_folder.glob("*.bin"))
    fingerprint = "|".join(
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in [hf_folder / "config.json", *weights]
    )
    digest = hashlib.sha256(f"{fingerprint}|{precision}|{' '.join(BUILD_OPTIONS)}".encode()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / f"onnx-{hf_folder.name}-{precision}-{digest}"
    if (target / "model.onnx").is_file() and (target / "genai_config.json").is_file():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    log.info("exporting %s to ONNX (%s weights) once into %s", hf_folder, precision, target)
    started = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "--input",
        str(hf_folder),
        "--output",
        str(partial),
        "--precision",
        precision,
        "--execution_provider",
        "cpu",
        "--cache_dir",
        str(partial / "hf-cache"),
        "--extra_options",
        *BUILD_OPTIONS,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (partial / "model.onnx").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise OnnxBuildError(
            f"onnxruntime-genai could not export {hf_folder} ({' / '.join(tail)}); use --backend torch"
        )
    shutil.rmtree(partial / "hf-cache", ignore_errors=True)
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "model.onnx").is_file():
            raise
    log.info("exported in %.1f s", time.monotonic() - started)
    return target


class OnnxRunner(KvCacheRunner):
    """Prompts and decode steps in ONNX Runtime; its attention op writes the buffers in place."""

    backend = "onnx"

    def __init__(
        self, folder: Path, facts: ModelFacts, precision: str, threads: int = 0, prefix_cache_mib: int = 0
    ) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped, import-not-found, unused-ignore]

        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        super().__init__(
            facts,
            int(config["num_hidden_layers"]),
            int(config["num_key_value_heads"]),
            int(config["head_size"]),
            MIN_DECODE_ROWS[precision],
            prefix_cache_mib,
            PREFIX_FRESH_TOKENS,
        )
        self._ort = ort
        self._model_path = folder / "model.onnx"
        self._threads = threads
        self.session  # noqa: B018 - loaded now, so that a model it cannot run stops start-up

    @functools.cached_property
    def session(self) -> Any:
        options = self._ort.SessionOptions()
        if self._threads:
            options.intra_op_num_threads = self._threads
        # Spinning threads would take the CPU from the event loop that streams the tokens out.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = self._ort.InferenceSession(
            str(self._model_path), options, providers=["CPUExecutionProvider"]
        )
        if "position_ids" in {i.name for i in session.get_inputs()}:
            raise OnnxBuildError("this ONNX export takes position_ids, which the runner does not feed")
        return session

    def _run(self, state: KvBatch, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if state.bound is None:
            binding = self.session.io_binding()
            binding.bind_output("logits")
            for layer in range(self.layers):
                for kind, arrays in (("key", state.keys), ("value", state.values)):
                    value = self._ort.OrtValue.ortvalue_from_numpy(arrays[layer])
                    binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                    binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
            state.bound = binding
        binding = state.bound
        # Unallocated each run: the shape of the logits changes between a prompt and a decode step.
        binding.bind_output("logits")
        # The binding reads these arrays at run time; the locals keep them alive until then.
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(binding)
        logits: np.ndarray = binding.get_outputs()[0].numpy()
        return logits[:, -1, :]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, KvBatch]:
        batch = self._new_batch(prompts)
        # One prompt per run: the attention op takes right padding only, so batching prompts of
        # different lengths would waste their padding, and a prompt is matmul-bound already (32
        # prompts of 62 tokens: 3.9 s one by one, 3.7 s as one padded batch with a per-row gather).
        logits: list[np.ndarray] = []
        for row, prompt in enumerate(prompts):
            # A row of the batch's buffers is one contiguous block, so each prompt runs on its own
            # row in place and the batch needs no copying together afterwards.
            state = KvBatch(
                [k[row : row + 1] for k in batch.keys],
                [v[row : row + 1] for v in batch.values],
                batch.lengths[row : row + 1],
            )
            cached = self._reuse_prefix(batch, row, *self._lookup(prompt))
            ids = np.asarray([list(prompt[cached:])], dtype=np.int64)
            logits.append(self._run(state, ids, np.ones((1, len(prompt)), np.int64)))
            batch.lengths[row] = len(prompt)
            self._remember(batch, row, prompt, cached)
        return torch.from_numpy(np.concatenate(logits)), batch

    def position_logits(self, tokens: Sequence[int]) -> Iterator[torch.Tensor]:
        """Every position's logits, one at a time: the export returns the last position's only,
        so the first token runs as a prompt and each next one as a decode step, on scratch
        buffers (no prefix cache is involved)."""
        batch = self._empty(1, len(tokens) + HEADROOM, self.min_decode_rows)
        row = KvBatch([k[:1] for k in batch.keys], [v[:1] for v in batch.values], batch.lengths[:1])
        first = self._run(row, np.asarray([[tokens[0]]], np.int64), np.ones((1, 1), np.int64))
        yield torch.from_numpy(np.ascontiguousarray(first))
        batch.lengths[0] = 1
        for token in tokens[1:]:
            yield self.decode(batch, torch.tensor([token], dtype=torch.long))

    def decode(self, state: KvBatch, tokens: torch.Tensor) -> torch.Tensor:
        self._make_room(state)
        rows = len(state.lengths)
        total = int(state.lengths.max()) + 1
        lengths = np.zeros(state.buffer_rows, np.int64)
        lengths[:rows] = state.lengths
        ids = np.zeros((state.buffer_rows, 1), np.int64)
        ids[:rows, 0] = tokens.numpy()
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(state, ids, mask)[:rows]
        state.lengths += 1
        return torch.from_numpy(logits)
