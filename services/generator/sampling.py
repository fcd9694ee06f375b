"""Per-row sampling for a batch whose rows each have their own knobs, vectorized over the rows.

Rows are independent (each row's softmax, sort and draw look only at that row), so a row's
token does not depend on its neighbours; a seeded row draws from its own torch.Generator. The
logits go through the constrained rows' token masks, logit_bias, the repetition penalty,
presence/frequency penalties, temperature, top-k/top-p, then the draw (greedy rows: the argmax
after the masks, biases and penalties). Logprobs are read from the distribution the sampler
draws from before its top-k/top-p cut: after the masks, the biases, the penalties and the
temperature (1 for greedy rows), as vLLM reports them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowKnobs:
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()


class BatchKnobs:
    """The knobs of every row as tensors, rebuilt whenever the rows change."""

    def __init__(self, rows: Sequence[RowKnobs], generators: Sequence[torch.Generator | None]) -> None:
        self.size = len(rows)
        self.sample_mask = torch.tensor([r.do_sample for r in rows], dtype=torch.bool)
        self.any_sample = bool(self.sample_mask.any())
        self.temperature = torch.tensor([r.temperature if r.do_sample else 1.0 for r in rows])
        self.top_k = torch.tensor([r.top_k if r.do_sample else 0 for r in rows], dtype=torch.long)
        self.top_p = torch.tensor([r.top_p if r.do_sample else 1.0 for r in rows])
        self.penalty = torch.tensor([r.repetition_penalty for r in rows])
        self.any_penalty = bool((self.penalty != 1.0).any())
        self.filter_rows = torch.nonzero((self.top_k > 0) | (self.top_p < 1.0)).flatten()
        self.any_temperature = bool((self.temperature != 1.0).any())
        self.presence_penalty = torch.tensor([r.presence_penalty for r in rows])
        self.frequency_penalty = torch.tensor([r.frequency_penalty for r in rows])
        self.any_count_penalty = bool(
            (self.presence_penalty != 0.0).any() or (self.frequency_penalty != 0.0).any()
        )
        # logit_bias as a sparse add: one (row, token id, bias) triple per entry of every row.
        entries = [(i, token, bias) for i, r in enumerate(rows) for token, bias in r.logit_bias]
        self.bias_rows = torch.tensor([e[0] for e in entries], dtype=torch.long)
        self.bias_ids = torch.tensor([e[1] for e in entries], dtype=torch.long)
        self.bias_values = torch.tensor([e[2] for e in entries], dtype=torch.float32)
        self.generators = list(generators)
        self.seeded_rows = [i for i, g in enumerate(generators) if g is not None and rows[i].do_sample]
        seeded = set(self.seeded_rows)
        self.unseeded_sample_rows = torch.tensor(
            [i for i, r in enumerate(rows) if r.do_sample and i not in seeded], dtype=torch.long
        )
        # Rows that ask for alternatives, and the most any of them asks for.
        self.top_rows = torch.tensor([i for i, r in enumerate(rows) if r.top_logprobs > 0], dtype=torch.long)
        self.max_top = max((r.top_logprobs for r in rows), default=0)


@dataclass(frozen=True)
class TokenMasks:
    """The tokens each constrained row must not take next: `refused` [R, V] (bool) of the rows
    `rows` [R]."""

    rows: torch.Tensor
    refused: torch.Tensor


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks | None) -> torch.Tensor:
    """The logits with every refused token of the masked rows at -inf; the other rows' logits
    are left as they are (unchanged when there are no masks)."""
    if masks is None:
        return logits
    if masks.rows.numel() == logits.shape[0]:  # every row constrained, in order
        return logits.masked_fill(masks.refused, float("-inf"))
    masked = logits.index_select(0, masks.rows).masked_fill_(masks.refused, float("-inf"))
    return logits.index_copy(0, masks.rows, masked)


def apply_logit_bias(logits: torch.Tensor, knobs: BatchKnobs) -> torch.Tensor:
    """The logits with each row's logit_bias added to its token ids (unchanged when no row has one)."""
    if not knobs.bias_rows.numel():
        return logits
    values = knobs.bias_values.to(logits.dtype)
    return logits.index_put((knobs.bias_rows, knobs.bias_ids), values, accumulate=True)


def penalties_of(counts: torch.Tensor, knobs: BatchKnobs) -> torch.Tensor:
    """OpenAI's presence and frequency penalties [B, V] of `counts` [B, V], how often each row has
    generated each token: frequency * count + presence * (count > 0)."""
    frequency = knobs.frequency_penalty[:, None]
    presence = knobs.presence_penalty[:, None]
    return frequency * counts + presence * (counts > 0).to(counts.dtype)


def record_tokens(
    counts: torch.Tensor, penalties: torch.Tensor, tokens: torch.Tensor, knobs: BatchKnobs
) -> None:
    """Counts each row's new token and updates that token's penalty in place: O(rows) per step,
    where recomputing `penalties_of` would read the whole [B, V] tensor."""
    index = tokens[:, None]
    counts.scatter_add_(1, index, torch.ones(index.shape, dtype=counts.dtype))
    penalties.scatter_(1, index, penalties_of(counts.gather(1, index), knobs))


def apply_penalties(logits: torch.Tensor, knobs: BatchKnobs, penalties: torch.Tensor | None) -> torch.Tensor:
    """The logits less each row's presence and frequency penalties (`penalties_of` the row's
    generated-token counts); unchanged when no row has them."""
    if not knobs.any_count_penalty or penalties is None:
        return logits
    return logits - penalties.to(logits.dtype)


@dataclass(frozen=True)
class TopLogprobs:
    """The max_top most likely (ids, logprobs) [R, max_top] of each row in `rows`, best first."""

    rows: list[int]
    ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass(frozen=True)
class Sampled:
    """The tokens drawn [B], their logprobs [B] and the alternatives of the rows that ask."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top: TopLogprobs | None = None


def _logprobs_of(
    logprobs: torch.Tensor,
    tokens: torch.Tensor,
    knobs: BatchKnobs,
    redo: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, TopLogprobs | None]:
    """The chosen tokens' logprobs and the asked-for alternatives from `logprobs` [B, V], the
    log-softmax the sampler computed anyway, which is the uncut distribution except for the rows
    in `redo` (rows, their logits before the cut); topk runs over the rows that ask only."""
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    if redo is not None:
        rows, scaled = redo
        if knobs.max_top:
            uncut = torch.log_softmax(scaled, dim=-1)
            logprobs = logprobs.index_copy(0, rows, uncut)
            fixed = uncut.gather(1, tokens.index_select(0, rows)[:, None]).squeeze(1)
        else:  # one reduction, no [R, V] result
            picked = scaled.gather(1, tokens.index_select(0, rows)[:, None]).squeeze(1)
            fixed = picked - torch.logsumexp(scaled, dim=-1)
        chosen = chosen.index_copy(0, rows, fixed)
    if not knobs.max_top:
        return chosen, None
    values, ids = logprobs.index_select(0, knobs.top_rows).topk(knobs.max_top, dim=-1)
    return chosen, TopLogprobs(knobs.top_rows.tolist(), ids, values)


def sample(
    logits: torch.Tensor,
    presence: torch.Tensor | None,
    knobs: BatchKnobs,
    penalties: torch.Tensor | None = None,
    masks: TokenMasks | None = None,
) -> Sampled:
    """The token of every row [B], its logprob (see the module's note) and the alternatives of
    the rows whose knobs ask for them. `penalties` [B, V] are the presence and frequency
    penalties of the tokens each row has generated; `masks` the constrained rows' refused tokens."""
    logits = apply_token_masks(logits, masks)
    logits = apply_logit_bias(logits, knobs)
    if knobs.any_penalty and presence is not None:
        # As in transformers' RepetitionPenaltyLogitsProcessor: every id seen so far, prompt included.
        rp = knobs.penalty[:, None]
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(presence, penalized, logits)
    logits = apply_penalties(logits, knobs, penalties)
    if not knobs.any_sample:
        tokens = logits.argmax(dim=-1)
        return Sampled(tokens, *_logprobs_of(torch.log_softmax(logits, dim=-1), tokens, knobs))
    if knobs.any_temperature:
        logits = logits / knobs.temperature[:, None]
    # Logprobs are read before the top-k/top-p cut: the cut rows' own log-softmax is redone from
    # their logits before the cut.
    redo = None
    if knobs.filter_rows.numel():
        rows = knobs.filter_rows
        part = logits.index_select(0, rows)
        redo = (rows, part)
        ordered, order = part.sort(dim=-1, descending=True)
        vocab = ordered.shape[-1]
        ranks = torch.arange(vocab)[None, :]
        top_k = knobs.top_k.index_select(0, rows)
        remove = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
        ordered = ordered.masked_fill(remove, float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        remove = (probs.cumsum(dim=-1) - probs) > knobs.top_p.index_select(0, rows)[:, None]
        ordered = ordered.masked_fill(remove, float("-inf"))
        logits = logits.index_copy(0, rows, torch.empty_like(part).scatter_(1, order, ordered))
    logprobs_all = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    probs_all = logprobs_all.exp()
    if knobs.unseeded_sample_rows.numel():
        rows = knobs.unseeded_sample_rows
        drawn = torch.multinomial(probs_all.index_select(0, rows), 1).squeeze(1)
        tokens = tokens.index_copy(0, rows, drawn)
    for row in knobs.seeded_rows:
        generator = knobs.generators[row]
        drawn = torch.multinomial(probs_all[row], 1, generator=generator)
        tokens[row] = drawn[0]
    return Sampled(tokens, *_logprobs_of(logprobs_all, tokens, knobs, redo))
