"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeded RNG."""
from __future__ import annotations

import torch

from .sampling import SamplingParams


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] fp32 with everything outside top-k / top-p set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample_tensor(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [S, V] (fp32), one SamplingParams and generator per row -> int64 [S] token ids on
    the logits' device, without waiting for the device (async scheduling reads them a step
    later)."""
    out = torch.argmax(logits, dim=-1)                   # greedy rows (ties: lowest id)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i].float() / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, V] (fp32), one SamplingParams and generator per row -> S token ids."""
    return sample_tensor(logits, params, generators).tolist()
