"""Perplexity, greedy agreement and K outlier statistics of a model under KV schemes.

A "scheme" string is "fp32" (the model untouched: its own attention, no cache format) or a
`KVScheme` ("bf16", "int8", "int4", "int4-bdr:h=32,seed=1", "int4-bdr:h=64@clip", ...).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import hadamard
from ..data.corpus import Window
from .hooks import KVHook
from .kvquant import KVScheme

FP32 = "fp32"


def _hidden(model, ids: torch.Tensor, **kw):
    """Last hidden states [1, T, H] (the decoder without its LM head)."""
    return model.model(input_ids=ids, **kw).last_hidden_state


def _logits(model, h: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def window_nll(model, window: Window, chunk: int = 128) -> tuple[float, int]:
    """(sum of -log p(token) over the window's scored tokens, count), in nats."""
    ids = torch.tensor([window.ids])
    with torch.inference_mode():
        h = _hidden(model, ids, use_cache=False)[0, :-1]
        target = ids[0, 1:]
        total = 0.0
        for s in range(0, h.shape[0], chunk):      # the LM head in chunks: Gemma's vocab is 262k
            lp = torch.log_softmax(_logits(model, h[s:s + chunk]), -1)
            total -= lp.gather(-1, target[s:s + chunk, None]).sum().item()
    return total, int(target.numel())


@dataclass
class PPLResult:
    scheme: str
    path: str                       # "reference" (fp32), "paged", "fake"
    ppl: float
    nll: float
    tokens: int
    per_source: dict = field(default_factory=dict)   # source -> ppl
    seconds: float = 0.0

    def to_dict(self):
        return dict(self.__dict__)


def make_hook(scheme: str, mode: str, **kw) -> KVHook | None:
    return None if scheme == FP32 else KVHook(KVScheme.parse(scheme), mode=mode, **kw)


def perplexity(model, windows: list[Window], scheme: str, mode: str = "paged",
               **hook_kw) -> PPLResult:
    """Teacher-forced perplexity over `windows` (each an independent sequence) under `scheme`."""
    t0 = time.time()
    hook = make_hook(scheme, mode, max_tokens=max(len(w.ids) for w in windows), **hook_kw)
    src_nll: dict[str, list] = {}
    for w in windows:
        if hook is None:
            nll, n = window_nll(model, w)
        else:
            hook.reset()
            with hook.attach(model):
                nll, n = window_nll(model, w)
        acc = src_nll.setdefault(w.source, [0.0, 0])
        acc[0] += nll
        acc[1] += n
    nll = sum(a[0] for a in src_nll.values())
    tokens = sum(a[1] for a in src_nll.values())
    return PPLResult(scheme, "reference" if hook is None else mode, math.exp(nll / tokens),
                     nll / tokens, tokens,
                     {s: math.exp(a[0] / a[1]) for s, a in src_nll.items()}, time.time() - t0)


def greedy(model, prompt: list[int], steps: int, scheme: str, mode: str = "paged",
           **hook_kw) -> list[int]:
    """Greedy continuation of `prompt` for `steps` tokens, decoding one token at a time with the
    K/V of the prompt and of every generated token held in the scheme's cache."""
    from transformers import DynamicCache
    hook = make_hook(scheme, mode, max_tokens=len(prompt) + steps, **hook_kw)
    ctx = hook.attach(model) if hook else _null()
    out: list[int] = []
    with torch.inference_mode(), ctx:
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompt])
        for _ in range(steps):
            h = _hidden(model, ids, past_key_values=cache, use_cache=True)[0, -1:]
            nxt = int(_logits(model, h)[0].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def agreement(ref: list[int], other: list[int]) -> dict:
    """First position where `other` leaves `ref` (None if never) and % identical positions."""
    first = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
    same = sum(a == b for a, b in zip(ref, other))
    return {"first_divergence": first, "identical_pct": 100.0 * same / max(1, len(ref)),
            "tokens": len(ref)}


class OutlierStats:
    """Per layer: max|k| / RMS(k) over the channels of each (token, KV head) K vector, before and
    after BDR with each block size in `blocks`; reported as the mean and max over vectors."""

    def __init__(self, blocks=(16, 32, 64, 128, 256)):
        self.blocks = blocks
        self.acc: dict[int, dict[str, list]] = {}

    def __call__(self, layer: int, key: torch.Tensor):          # key [Hkv, n, D]
        d = key.shape[-1]
        k = key.float().reshape(-1, d)
        a = self.acc.setdefault(layer, {})
        variants = [("none", k)] + [(f"h={b}", hadamard.rotate(k, b)) for b in self.blocks if d % b == 0 and b <= d]
        for name, x in variants:
            r = x.abs().amax(-1) / x.pow(2).mean(-1).sqrt().clamp_min(1e-12)
            s = a.setdefault(name, [0.0, 0, 0.0])
            s[0] += float(r.sum())
            s[1] += r.numel()
            s[2] = max(s[2], float(r.max()))

    def table(self) -> list[dict]:
        rows = []
        for layer in sorted(self.acc):
            row = {"layer": layer}
            for name, (tot, n, mx) in self.acc[layer].items():
                row[name] = {"mean": tot / n, "max": mx}
            rows.append(row)
        return rows
