"""The gguf backend: prompts and decode steps computed straight from a GGUF Llama file's blocks by
the block decoder (gguf_decoder.py), into the shared KV buffers (kv_cache.py), on a CPU."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from services.generator.gguf_decoder import PREFILL_ROWS, GgufDecoder
from services.generator.kv_cache import HEADROOM, KvBatch, KvCacheRunner
from services.generator.prefix_cache import common_prefix
from services.generator.runner import ModelFacts

# A prompt sharing this many more tokens with a prompt of the same join than with the prefix cache
# waits for that prompt's keys and values (a join's prompts are prefilled together).
SHARED_IN_JOIN = 16


def rotary_tables_of(hf_config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The cos and sin tables [max_position_embeddings, head_dim / 2] of unscaled rotary
    embeddings, bit for bit those onnxruntime-genai's builder exports for the same config."""
    hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    dim = int(hf_config.get("head_dim") or hidden // heads)
    rope = hf_config.get("rope_parameters") or {}
    theta = float(hf_config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    # The builder's own arithmetic (float32 torch, both halves then the first kept), so that the
    # tables match its export exactly. On one thread: torch's thread pool started from the loading
    # thread slowed the served model's one stream 3x (docs/backends.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        length = int(hf_config["max_position_embeddings"])
        positions = torch.arange(length, dtype=torch.int64).type_as(inv_freq)
        freqs = torch.outer(positions, inv_freq)
        both = torch.cat((freqs, freqs), dim=-1)
        return both.cos()[:, : dim // 2].numpy(), both.sin()[:, : dim // 2].numpy()
    finally:
        torch.set_num_threads(threads)


class GgufRunner(KvCacheRunner):
    """Prompts (a join's together) and decode steps through one GgufDecoder."""

    backend = "gguf"

    def __init__(self, decoder: GgufDecoder, facts: ModelFacts, prefix_cache_mib: int = 0) -> None:
        shape = decoder.model
        # The decoder computes a prompt's token as it decodes one, so one fresh token is exact.
        super().__init__(facts, shape.layers, shape.kv_heads, shape.head_dim, 1, prefix_cache_mib, 1)
        self.decoder = decoder

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, KvBatch]:
        """Every prompt's tokens through the decoder in one pass per group: a prompt that shares
        much more with an earlier prompt of the group than with the cache starts a new group after
        that prompt is cached."""
        batch = self._new_batch(prompts)
        logits: list[np.ndarray] = [np.empty(0, np.float32)] * len(prompts)
        group: list[tuple[int, int]] = []  # (row, cached)

        def run_group() -> None:
            pieces = [(row, cached, list(prompts[row][cached:])) for row, cached in group]
            computed = self.decoder.prefill(batch.keys, batch.values, pieces)
            for (row, cached), row_logits in zip(group, computed, strict=True):
                logits[row] = row_logits
                self._remember(batch, row, prompts[row], cached)
            group.clear()

        for row, prompt in enumerate(prompts):
            found = self._lookup(prompt)
            if self.prefix_cache is not None and any(
                common_prefix(prompt, prompts[r]) >= found[0] + SHARED_IN_JOIN for r, _ in group
            ):
                run_group()
                found = self._lookup(prompt)
            group.append((row, self._reuse_prefix(batch, row, *found)))
            batch.lengths[row] = len(prompt)
        run_group()
        return torch.from_numpy(np.stack(logits)), batch

    def prefill_chunks(
        self, state: KvBatch, pieces: Sequence[tuple[int, Sequence[int], int]]
    ) -> torch.Tensor:
        """Each (row, prompt, count) computes the next `count` tokens of `prompt` in `row` of a
        state from open_rows, after those the row holds; the logits after each piece's last token
        [pieces, V]. The kernel continues a row's keys and values as it does after a cached prefix."""
        work = []
        for row, prompt, count in pieces:
            start = int(state.lengths[row])
            if count < 1 or start + count > len(prompt):
                raise ValueError(f"row {row} holds {start} of {len(prompt)} prompt tokens, {count} asked")
            work.append((row, start, list(prompt[start : start + count])))
        end = max(start + len(tokens) for _, start, tokens in work)
        if end > state.capacity:  # select() trims a state to its rows' lengths so far
            self._reshape(state, state.buffer_rows, end + HEADROOM)
        logits = self.decoder.prefill(state.keys, state.values, work)
        for row, prompt, count in pieces:
            self._chunk_done(state, row, prompt, count)
        return torch.from_numpy(logits)

    def position_logits(self, tokens: Sequence[int]) -> Iterator[torch.Tensor]:
        """Every position's logits, PREFILL_ROWS rows at a time, from scratch buffers (the
        kernel's forward returns any rows asked for, so this costs one prompt's pass; no prefix
        cache is involved)."""
        scratch = self._empty(1, len(tokens))
        for at in range(0, len(tokens), PREFILL_ROWS):
            piece = np.asarray(tokens[at : at + PREFILL_ROWS], np.int64)
            every = np.arange(len(piece), dtype=np.int64)
            logits = self.decoder.forward(
                scratch.keys,
                scratch.values,
                np.zeros(len(piece), np.int64),
                at + every,
                piece,
                every,
                self.decoder.prompt_model,
            )
            yield torch.from_numpy(logits)

    def decode(self, state: KvBatch, tokens: torch.Tensor) -> torch.Tensor:
        self._make_room(state)
        logits = self.decoder.decode(state.keys, state.values, state.lengths, tokens.numpy())
        state.lengths += 1
        return torch.from_numpy(logits)
