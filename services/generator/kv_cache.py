"""The KV cache layout the onnx and gguf runners share: per layer one fp32 buffer [rows, kv_heads,
capacity, head_dim], each row's tokens at the start of its slice, and the prefix cache over it;
rows are selected, merged and grown here, the forward passes are the runners' own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.generator import metrics
from services.generator.beam import beam_search
from services.generator.prefix_cache import CachedPrefix, PrefixCache
from services.generator.runner import BeamSettings, ModelFacts

HEADROOM = 64


@dataclass
class KvBatch:
    keys: list[np.ndarray]  # per layer [B, kv_heads, capacity, head_dim]
    values: list[np.ndarray]
    lengths: np.ndarray  # [B] tokens held per live row
    bound: Any = None  # a runtime's binding of these buffers, reused while they stay the same

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def buffer_rows(self) -> int:
        return int(self.keys[0].shape[0])


class KvCacheRunner:
    """What both CPU runners do to a batch's buffers; subclasses prefill and decode into them."""

    backend: str

    def __init__(
        self,
        facts: ModelFacts,
        layers: int,
        kv_heads: int,
        head_size: int,
        min_decode_rows: int,
        prefix_cache_mib: int,
        fresh_tokens: int,
    ) -> None:
        self.facts = facts
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_size = head_size
        self.min_decode_rows = min_decode_rows
        self.prefix_cache = PrefixCache(prefix_cache_mib << 20, fresh_tokens) if prefix_cache_mib else None

    def _empty(self, rows: int, capacity: int, buffer_rows: int = 0) -> KvBatch:
        shape = (max(rows, buffer_rows), self.kv_heads, capacity, self.head_size)
        return KvBatch(
            [np.zeros(shape, np.float32) for _ in range(self.layers)],
            [np.zeros(shape, np.float32) for _ in range(self.layers)],
            np.zeros(rows, np.int64),
        )

    def _new_batch(self, prompts: Sequence[Sequence[int]]) -> KvBatch:
        return self._empty(len(prompts), max(len(p) for p in prompts) + HEADROOM, self.min_decode_rows)

    def _lookup(self, prompt: Sequence[int]) -> tuple[int, CachedPrefix | None]:
        return self.prefix_cache.longest_prefix(prompt) if self.prefix_cache is not None else (0, None)

    def _reuse_prefix(self, batch: KvBatch, row: int, cached: int, entry: CachedPrefix | None) -> int:
        """Copy a cached prefix (`cached` tokens of `entry`) into the batch's `row`; its length."""
        if entry is not None:
            # The rest is appended after these positions, as a decode step appends one.
            for buffers, held in ((batch.keys, entry.keys), (batch.values, entry.values)):
                for layer, array in enumerate(held):
                    buffers[layer][row, :, :cached] = array[:, :cached]
        return cached

    def _remember(self, batch: KvBatch, row: int, prompt: Sequence[int], cached: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.add(prompt, [k[row] for k in batch.keys], [v[row] for v in batch.values])
            metrics.PREFIX_CACHE_QUERIED_TOKENS.inc(len(prompt))
            metrics.PREFIX_CACHE_HIT_TOKENS.inc(cached)

    def _make_room(self, state: KvBatch) -> None:
        """Grow the buffers, where needed, to take one more token in every row."""
        total = int(state.lengths.max()) + 1
        grow = total > state.capacity
        if grow or state.buffer_rows < self.min_decode_rows:
            # Grown by half at least, so that a long generation copies its cache a few times only.
            capacity = max(total + HEADROOM, state.capacity * 3 // 2) if grow else state.capacity
            self._reshape(state, max(state.buffer_rows, self.min_decode_rows), capacity)

    def _reshape(self, state: KvBatch, buffer_rows: int, capacity: int) -> None:
        for arrays in (state.keys, state.values):
            for layer, old in enumerate(arrays):
                new = np.zeros((buffer_rows, old.shape[1], capacity, old.shape[3]), np.float32)
                new[: old.shape[0], :, : old.shape[2]] = old
                arrays[layer] = new
        state.bound = None

    def select(self, state: KvBatch, rows: Sequence[int]) -> KvBatch:
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

    def merge(self, first: KvBatch, second: KvBatch) -> KvBatch:
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

    def cached_prefix(self, prompt: Sequence[int]) -> int | None:
        """How many leading tokens of `prompt` the prefix cache holds; None without a cache."""
        return self._lookup(prompt)[0] if self.prefix_cache is not None else None

    def open_rows(self, state: KvBatch | None, prompts: Sequence[Sequence[int]]) -> tuple[KvBatch, list[int]]:
        """Rows for `prompts` after those of `state` (a new state when None), each holding its
        longest cached prefix, to be prefilled in chunks; (the state, the tokens each new row holds)."""
        batch = self._new_batch(prompts)
        held: list[int] = []
        for row, prompt in enumerate(prompts):
            cached = self._reuse_prefix(batch, row, *self._lookup(prompt))
            batch.lengths[row] = cached
            held.append(cached)
            if self.prefix_cache is not None:
                metrics.PREFIX_CACHE_QUERIED_TOKENS.inc(len(prompt))
                metrics.PREFIX_CACHE_HIT_TOKENS.inc(cached)
        return (batch if state is None else self.merge(state, batch)), held

    def _chunk_done(self, state: KvBatch, row: int, prompt: Sequence[int], count: int) -> None:
        """Records `count` more prompt tokens in `row`; a finished prompt goes to the prefix cache."""
        state.lengths[row] += count
        if self.prefix_cache is not None and int(state.lengths[row]) == len(prompt):
            self.prefix_cache.add(prompt, [k[row] for k in state.keys], [v[row] for v in state.values])

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, KvBatch]:
        raise NotImplementedError

    def decode(self, state: KvBatch, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def beam_search(self, prompt_ids: Sequence[int], settings: BeamSettings) -> list[list[int]]:
        return beam_search(self, prompt_ids, settings)
