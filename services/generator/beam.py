"""Beam search over any runner's prefill/decode/select, for runners without a `generate` of their
own. It follows transformers' rules: scores are summed log-probabilities, a hypothesis ending in
EOS is kept with its score divided by its length, the search stops once no running beam can
beat the worst kept hypothesis (or at max_new_tokens), and the best num_return_sequences win."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from services.generator.runner import BeamSettings

if TYPE_CHECKING:
    from services.generator.runner import Runner


def _scores(
    logits: torch.Tensor, beams: list[list[int]], prompt: Sequence[int], settings: BeamSettings
) -> torch.Tensor:
    if settings.repetition_penalty != 1.0:
        penalty = settings.repetition_penalty
        for row, beam in enumerate(beams):
            seen = torch.tensor(sorted({*prompt, *beam}), dtype=torch.long)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
    if settings.do_sample and settings.temperature > 0:
        logits = logits / settings.temperature
    return torch.log_softmax(logits, dim=-1)


@torch.inference_mode()
def beam_search(runner: Runner, prompt_ids: Sequence[int], settings: BeamSettings) -> list[list[int]]:
    width = settings.num_beams
    eos = runner.facts.eos_token_ids
    generator = None
    if settings.do_sample and settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed & 0xFFFF_FFFF_FFFF_FFFF)
    logits, state = runner.prefill([prompt_ids])
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1)
    finished: list[tuple[float, list[int]]] = []
    done = False
    for step in range(settings.max_new_tokens):
        logprobs = _scores(logits.clone(), beams, prompt_ids, settings)
        vocab = logprobs.shape[-1]
        total = (scores[:, None] + logprobs).flatten()
        count = min(2 * width, total.numel())
        if settings.do_sample:
            picked = torch.multinomial(torch.softmax(total, dim=0), count, generator=generator)
            candidates = total[picked]
            order = candidates.argsort(descending=True)
            candidates, picked = candidates[order], picked[order]
        else:
            candidates, picked = total.topk(count)
        next_beams: list[list[int]] = []
        next_scores: list[float] = []
        origins: list[int] = []
        for rank, (score, flat) in enumerate(zip(candidates.tolist(), picked.tolist(), strict=True)):
            origin, token = divmod(int(flat), vocab)
            sequence = [*beams[origin], token]
            if token in eos:
                if rank < width:
                    finished.append((score / len(sequence), sequence))
                continue
            next_beams.append(sequence)
            next_scores.append(score)
            origins.append(origin)
            if len(next_beams) == width:
                break
        finished = sorted(finished, key=lambda item: -item[0])[:width]
        done = (
            len(finished) >= width and max(next_scores, default=-float("inf")) / (step + 1) <= finished[-1][0]
        )
        beams, scores = next_beams, torch.tensor(next_scores)
        if done or not beams or step == settings.max_new_tokens - 1:
            break
        state = runner.select(state, origins)
        logits = runner.decode(state, torch.tensor([b[-1] for b in beams], dtype=torch.long))
    if not done:
        finished += [(float(s) / max(1, len(b)), b) for s, b in zip(scores.tolist(), beams, strict=True)]
    finished.sort(key=lambda item: -item[0])
    return [sequence for _, sequence in finished[: settings.num_return_sequences]]
