"""Calibration for the prototype variants, on text disjoint from the evaluation text.

    means   per layer, the mean K vector (after RoPE) of each KV head over the calibration
            tokens: [Hkv, 1, D]. Used by the "center" variant.
    levels  16 levels in [0, 1] with 0 and 1 fixed, fitted by Lloyd-Max (k-means in 1-D) to
            u = (x - min) / (max - min) of the BDR-rotated K vectors of every layer (interior
            elements only: the min and max of a vector are exactly 0 and 1 and stay exact).
            Used by the "lut" variant.
    vmeans  per layer, the mean V vector of each KV head: [Hkv, 1, D] ("vcenter" variant).

Both are computed once per (model, block size) and cached under ~/.cache/sawtrt/eval/.
"""
from __future__ import annotations

import torch

from .. import hadamard
from .corpus import windows
from .hf_models import cache_root
from .hooks import KVHook
from .runner import window_nll


def lloyd_levels(u: torch.Tensor, n: int = 16, iters: int = 60) -> torch.Tensor:
    """n levels in [0, 1] (first 0, last 1) minimising the squared error of nearest-level
    rounding of the samples u in [0, 1]."""
    lv = torch.linspace(0, 1, n, dtype=torch.float64)
    u = u.double().flatten()
    for _ in range(iters):
        mids = (lv[1:] + lv[:-1]) / 2
        idx = torch.bucketize(u, mids)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, u)
        cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, torch.ones_like(u))
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1), lv)
        new[0], new[-1] = 0.0, 1.0
        lv = new
    return lv.float()


def calibrate(model, tokenizer, label: str, block: int, tokens: int = 1024, window: int = 512,
              refresh: bool = False) -> dict:
    path = cache_root() / label / f"calib_h{block}_{tokens}.pt"
    if path.exists() and not refresh:
        out = torch.load(path, weights_only=True)
        if "vmeans" in out:
            return out
    keys: dict[int, list] = {}
    values: dict[int, list] = {}

    class Rec(KVHook):
        def __call__(self, module, q, k, v, scaling, sw):
            keys.setdefault(module.layer_idx, []).append(k[0].detach().float().clone())
            values.setdefault(module.layer_idx, []).append(v[0].detach().float().clone())
            return super().__call__(module, q, k, v, scaling, sw)

    ws, _ = windows(tokenizer, ("calib",), tokens=tokens, window=window)
    hook = Rec("bf16", mode="fake")
    for w in ws:
        with hook.attach(model):
            window_nll(model, w)
    means, us = {}, []
    for layer, ks in keys.items():
        k = torch.cat(ks, 1)                     # [Hkv, T, D]
        means[layer] = k.mean(1, keepdim=True)
        r = hadamard.rotate(k.reshape(-1, k.shape[-1]), block)
        lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
        u = (r - lo) / (hi - lo).clamp_min(1e-12)
        us.append(u[(u > 0) & (u < 1)])
    vmeans = {layer: torch.cat(vs, 1).mean(1, keepdim=True) for layer, vs in values.items()}
    out = {"means": means, "vmeans": vmeans, "levels": lloyd_levels(torch.cat(us)), "block": block,
           "tokens": tokens}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out
