"""The transformers runner: one KV cache with left padding, an attention mask and explicit position
ids, so rows of different lengths decode together; joining pads the shorter side on the left,
leaving selects the surviving rows and drops columns that are padding for every row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.generator.runner import BeamSettings, ModelFacts


class _GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A KV cache layer that appends into spare capacity: the stock layer concatenates the whole
    cache on every decode step, which copies every row's keys and values once per token."""

    _spare_keys: torch.Tensor | None = None
    _spare_values: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        current_keys = cast(torch.Tensor, self.keys)
        current_values = cast(torch.Tensor, self.values)
        old = int(current_keys.shape[-2]) if current_keys.numel() else 0
        new = old + int(key_states.shape[-2])
        buffer = self._spare_keys
        # The runner replaces `keys`/`values` when rows join or leave; then the buffer is rebuilt.
        fits = (
            buffer is not None
            and old > 0
            and current_keys.data_ptr() == buffer.data_ptr()
            and buffer.shape[0] == key_states.shape[0]
            and buffer.shape[-2] >= new
        )
        if not fits:
            capacity = new + max(64, new // 2)
            keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
            if old:
                keys[:, :, :old] = current_keys
                values[:, :, :old] = current_values
            self._spare_keys, self._spare_values = keys, values
        assert self._spare_keys is not None and self._spare_values is not None
        self._spare_keys[:, :, old:new] = key_states
        self._spare_values[:, :, old:new] = value_states
        self.keys = self._spare_keys[:, :, :new]
        self.values = self._spare_values[:, :, :new]
        return self.keys, self.values


def _new_cache() -> Any:
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer
    return cache


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


@dataclass
class TorchBatch:
    cache: Any
    mask: torch.Tensor  # [B, T] 1 where a column holds a real token of that row
    positions: torch.Tensor  # [B] position id of each row's next token


class TorchRunner:
    backend = "torch"

    def __init__(self, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.facts = ModelFacts.of(model.config, model.generation_config.eos_token_id, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.facts.eos_token_ids), 0))

    def _mask_arg(self, mask: torch.Tensor) -> torch.Tensor | None:
        """No mask when no row is padded: the model then takes its faster unmasked causal path."""
        return None if bool(mask.all()) else mask.to(self.device)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, TorchBatch]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = _new_cache()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self._mask_arg(mask),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float().cpu()
        return logits, TorchBatch(cache, mask, mask.sum(dim=1))

    def position_logits(self, tokens: Sequence[int]) -> Iterator[torch.Tensor]:
        """Every position's logits of one forward pass without a cache, in one chunk."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=False)
        yield cast(torch.Tensor, out.logits[0].float().cpu())

    def decode(self, state: TorchBatch, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.cat([state.mask, torch.ones(len(tokens), 1, dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=tokens[:, None].to(self.device),
            attention_mask=self._mask_arg(mask),
            position_ids=state.positions[:, None].to(self.device),
            past_key_values=state.cache,
            use_cache=True,
        )
        state.mask = mask
        state.positions = state.positions + 1
        return cast(torch.Tensor, out.logits[:, -1, :].float().cpu())

    def select(self, state: TorchBatch, rows: Sequence[int]) -> TorchBatch:
        index = torch.tensor(list(rows), dtype=torch.long)
        mask = state.mask.index_select(0, index)
        # Columns that are padding for every surviving row are dropped from the cache.
        used = torch.nonzero(mask.any(dim=0)).flatten()
        start = int(used[0]) if used.numel() else mask.shape[1]
        device_index = index.to(self.device)
        for layer in _layers(state.cache):
            layer.keys = layer.keys.index_select(0, device_index)[:, :, start:]
            layer.values = layer.values.index_select(0, device_index)[:, :, start:]
        return TorchBatch(state.cache, mask[:, start:], state.positions.index_select(0, index))

    def merge(self, first: TorchBatch, second: TorchBatch) -> TorchBatch:
        old, new = first.mask.shape[1], second.mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(_layers(first.cache), _layers(second.cache), strict=True):
            mine.keys = torch.cat(
                [F.pad(mine.keys, (0, 0, width - old, 0)), F.pad(theirs.keys, (0, 0, width - new, 0))]
            )
            mine.values = torch.cat(
                [F.pad(mine.values, (0, 0, width - old, 0)), F.pad(theirs.values, (0, 0, width - new, 0))]
            )
        mask = torch.cat([F.pad(first.mask, (width - old, 0)), F.pad(second.mask, (width - new, 0))])
        return TorchBatch(first.cache, mask, torch.cat([first.positions, second.positions]))

    def beam_search(self, prompt_ids: Sequence[int], settings: BeamSettings) -> list[list[int]]:
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "num_beams": settings.num_beams,
            "num_return_sequences": settings.num_return_sequences,
            "do_sample": settings.do_sample,
            "repetition_penalty": settings.repetition_penalty,
            "pad_token_id": settings.pad_token_id,
            "eos_token_id": sorted(self.facts.eos_token_ids),
            "output_scores": False,
            "return_dict_in_generate": True,
        }
        if settings.do_sample:
            kwargs.update(
                temperature=settings.temperature, top_k=settings.top_k or None, top_p=settings.top_p
            )
            if settings.seed is not None:
                torch.manual_seed(settings.seed & 0xFFFF_FFFF_FFFF_FFFF)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        rows: list[list[int]] = out.sequences[:, ids.shape[1] :].tolist()
        return rows
