"""The ONNX Runtime runner: the model exported once by onnxruntime-genai's model builder (fp32
MatMul by default, or int8/int4 weight-only MatMulNBits; GroupQueryAttention), run by onnxruntime
on a CPU.

fp32 computes what transformers computes in fp32, with far less framework time per op than torch
eager (SmolLM2-135M on an AVX2 machine: 25-26 vs 8-10 tok/s served on one stream, 145 vs 81-85 at
32 streams of one repeated prompt, 172 vs 94 at 32 distinct chats with the prefix cache).
int8 and int4 read a quarter and an eighth of fp32's weight bytes, which is what a lone stream
waits on (44 tok/s served with int8), but quantize the activations too, which changes answers.

The KV cache of a batch is one buffer per layer, [rows, kv_heads, capacity, head_dim], with each
row's tokens at the start of its slice (right padding) and its length kept here. New prompts are
prefilled each on its own row, after the keys and values of the longest prefix the prefix cache
holds for it (in ONNX Runtime one by one). The attention op reads and writes that buffer in place (past and
present share it), so a decode step copies no cache; the mask tells the op each row's length and
the position of its new token. Rows past the live ones are scratch: they decode a pad token at
position 0 and are never read.

At fp32 on a GGUF model, the GGUF block decoder (gguf_decoder.py) takes the prompts and the decode
steps where it can run: the same weights, read from the file's 4-bit blocks, into the same buffers
(a join's prompts together, a row per token, in pieces of PREFILL_ROWS tokens); ONNX Runtime's
session is then not even loaded (only the rotary tables come from its model)."""

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.generator import metrics
from services.generator.beam import beam_search
from services.generator.gguf_decoder import GgufDecoder
from services.generator.prefix_cache import CachedPrefix, PrefixCache
from services.generator.runner import BeamSettings, ModelFacts

log = logging.getLogger(__name__)

HEADROOM = 64
# MLAS computes a one-row int8/int4 matmul (MatMulNBits) with another kernel than a many-row one,
# and the logits differ (by up to 0.5 here); with those weights a lone decoding row is paired with
# a scratch row so that a sequence gets the same numbers, and a seeded request the same text, alone
# or inside a batch. fp32 matmuls give every row the same numbers at any row count (checked: 0.0
# difference), and a lone row decodes about 5% faster without the scratch row.
MIN_DECODE_ROWS = {"fp32": 1, "int8": 2, "int4": 2}
# A prompt continuing a cached prefix computes two tokens at least: one token would take the
# attention op's decode path (and int8's one-row kernel), whose logits differ from a full prefill's
# (by 3e-5 at fp32, 0.7 at int8); from two tokens on they are identical. The GGUF block decoder
# computes a prompt's token as it decodes one, so one is exact there.
PREFIX_FRESH_TOKENS = 2
# A prompt sharing this many more tokens with a prompt of the same join than with the prefix cache
# waits for that prompt's keys and values (the GGUF decoder prefills a join's prompts together).
SHARED_IN_JOIN = 16


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


@dataclass
class OnnxBatch:
    keys: list[np.ndarray]  # per layer [B, kv_heads, capacity, head_dim]
    values: list[np.ndarray]
    lengths: np.ndarray  # [B] tokens held per live row
    bound: Any = None  # the IO binding of these buffers, reused while they stay the same

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def buffer_rows(self) -> int:
        return int(self.keys[0].shape[0])


class OnnxRunner:
    backend = "onnx"

    def __init__(
        self,
        folder: Path,
        facts: ModelFacts,
        precision: str,
        threads: int = 0,
        prefix_cache_mib: int = 0,
        decoder: GgufDecoder | None = None,
    ) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped, import-not-found, unused-ignore]

        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers = int(config["num_hidden_layers"])
        self.kv_heads = int(config["num_key_value_heads"])
        self.head_size = int(config["head_size"])
        self.facts = facts
        self.min_decode_rows = MIN_DECODE_ROWS[precision]
        self.decoder = decoder
        fresh = 1 if decoder is not None else PREFIX_FRESH_TOKENS
        self.prefix_cache = PrefixCache(prefix_cache_mib << 20, fresh) if prefix_cache_mib else None
        self._ort = ort
        self._model_path = folder / "model.onnx"
        self._threads = threads
        if decoder is None:
            self.session  # noqa: B018 - loaded now, so that a model it cannot run stops start-up
        # else ONNX Runtime's copy of the fp32 weights (540 MB for the default model) is loaded
        # only if something runs without the decoder.

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

    def _empty(self, rows: int, capacity: int, buffer_rows: int = 0) -> OnnxBatch:
        shape = (max(rows, buffer_rows), self.kv_heads, capacity, self.head_size)
        return OnnxBatch(
            [np.zeros(shape, np.float32) for _ in range(self.layers)],
            [np.zeros(shape, np.float32) for _ in range(self.layers)],
            np.zeros(rows, np.int64),
        )

    def _run(self, state: OnnxBatch, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
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

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, OnnxBatch]:
        batch = self._empty(len(prompts), max(len(p) for p in prompts) + HEADROOM, self.min_decode_rows)
        if self.decoder is not None:
            return self._prefill_with_decoder(prompts, batch, self.decoder), batch
        # One prompt per run: the attention op takes right padding only, so batching prompts of
        # different lengths would waste their padding, and a prompt is matmul-bound already (32
        # prompts of 62 tokens: 3.9 s one by one, 3.7 s as one padded batch with a per-row gather).
        logits: list[np.ndarray] = []
        for row, prompt in enumerate(prompts):
            # A row of the batch's buffers is one contiguous block, so each prompt runs on its own
            # row in place and the batch needs no copying together afterwards.
            state = OnnxBatch(
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

    def _prefill_with_decoder(
        self, prompts: Sequence[Sequence[int]], batch: OnnxBatch, decoder: GgufDecoder
    ) -> torch.Tensor:
        """Every prompt's tokens through the block decoder in one pass per group: a prompt that
        shares much more with an earlier prompt of the group than with the cache (a burst of chats
        with the same system prompt on a cold cache) starts a new group after that prompt is cached."""
        logits: list[np.ndarray] = [np.empty(0, np.float32)] * len(prompts)
        group: list[tuple[int, int]] = []  # (row, cached)

        def run_group() -> None:
            pieces = [(row, cached, list(prompts[row][cached:])) for row, cached in group]
            computed = decoder.prefill(batch.keys, batch.values, pieces)
            for (row, cached), row_logits in zip(group, computed, strict=True):
                logits[row] = row_logits
                self._remember(batch, row, prompts[row], cached)
            group.clear()

        for row, prompt in enumerate(prompts):
            found = self._lookup(prompt)
            if self.prefix_cache is not None and any(
                _common_prefix(prompt, prompts[r]) >= found[0] + SHARED_IN_JOIN for r, _ in group
            ):
                run_group()
                found = self._lookup(prompt)
            group.append((row, self._reuse_prefix(batch, row, *found)))
            batch.lengths[row] = len(prompt)
        run_group()
        return torch.from_numpy(np.stack(logits))

    def _lookup(self, prompt: Sequence[int]) -> tuple[int, CachedPrefix | None]:
        return self.prefix_cache.longest_prefix(prompt) if self.prefix_cache is not None else (0, None)

    def _reuse_prefix(self, batch: OnnxBatch, row: int, cached: int, entry: CachedPrefix | None) -> int:
        """Copy a cached prefix (`cached` tokens of `entry`) into the batch's `row`; its length."""
        if entry is not None:
            # The rest is appended after these positions, as a decode step appends one.
            for buffers, held in ((batch.keys, entry.keys), (batch.values, entry.values)):
                for layer, array in enumerate(held):
                    buffers[layer][row, :, :cached] = array[:, :cached]
        return cached

    def _remember(self, batch: OnnxBatch, row: int, prompt: Sequence[int], cached: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.add(prompt, [k[row] for k in batch.keys], [v[row] for v in batch.values])
            metrics.PREFIX_CACHE_QUERIED_TOKENS.inc(len(prompt))
            metrics.PREFIX_CACHE_HIT_TOKENS.inc(cached)

    def decode(self, state: OnnxBatch, tokens: torch.Tensor) -> torch.Tensor:
        rows = len(state.lengths)
        total = int(state.lengths.max()) + 1
        grow = total > state.capacity
        if grow or state.buffer_rows < self.min_decode_rows:
            # Grown by half at least, so that a long generation copies its cache a few times only.
            capacity = max(total + HEADROOM, state.capacity * 3 // 2) if grow else state.capacity
            self._reshape(state, max(state.buffer_rows, self.min_decode_rows), capacity)
        if self.decoder is not None:
            logits = self.decoder.decode(state.keys, state.values, state.lengths, tokens.numpy())
            state.lengths += 1
            return torch.from_numpy(logits)
        lengths = np.zeros(state.buffer_rows, np.int64)
        lengths[:rows] = state.lengths
        ids = np.zeros((state.buffer_rows, 1), np.int64)
        ids[:rows, 0] = tokens.numpy()
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(state, ids, mask)[:rows]
        state.lengths += 1
        return torch.from_numpy(logits)

    def _reshape(self, state: OnnxBatch, buffer_rows: int, capacity: int) -> None:
        for arrays in (state.keys, state.values):
            for layer, old in enumerate(arrays):
                new = np.zeros((buffer_rows, old.shape[1], capacity, old.shape[3]), np.float32)
                new[: old.shape[0], :, : old.shape[2]] = old
                arrays[layer] = new
        state.bound = None

    def select(self, state: OnnxBatch, rows: Sequence[int]) -> OnnxBatch:
        index = np.asarray(list(rows), dtype=np.int64)
        lengths = state.lengths[index]
        # Keep the buffers no longer than the longest surviving row needs.
        capacity = min(state.capacity, int(lengths.max()) + HEADROOM)
        selected = self._empty(len(index), capacity, self.min_decode_rows)
        for target, source in (
            *zip(selected.keys, state.keys, strict=True),
            *zip(selected.values, state.values, strict=True),
        ):
            target[: len(index)] = source[index, :, :capacity]
        selected.lengths = lengths.copy()
        return selected

    def merge(self, first: OnnxBatch, second: OnnxBatch) -> OnnxBatch:
        states = (first, second)
        capacity = max(state.capacity for state in states)
        merged = self._empty(sum(len(state.lengths) for state in states), capacity, self.min_decode_rows)
        start = 0
        for state in states:
            rows = len(state.lengths)
            for target, source in (
                *zip(merged.keys, state.keys, strict=True),
                *zip(merged.values, state.values, strict=True),
            ):
                target[start : start + rows, :, : source.shape[2]] = source[:rows]
            start += rows
        merged.lengths = np.concatenate([state.lengths for state in states])
        return merged

    def beam_search(self, prompt_ids: Sequence[int], settings: BeamSettings) -> list[list[int]]:
        return beam_search(self, prompt_ids, settings)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
