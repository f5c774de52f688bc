"""Calibration for the prototype variants, on text disjoint from the evaluation text.

    means   per layer, the mean K vector (after RoPE) of each KV head over the calibration
            tokens: [Hkv, 1, D]. Used by the "center" variant.
    levels  16 levels in [0, 1] with 0 and 1 fixed, fitted by Lloyd-Max (k-means in 1-D) to
            u = (x - min) / (max - min) of the BDR-rotated K vectors of every layer (interior
            elements only: the min and max of a vector are exactly 0 and 1 and stay exact).
            Used by the "lut" variant.
    vmeans  per layer, the mean V vector of each KV head: [Hkv, 1, D] ("vcenter" variant).
    kcov    per layer, the covariance of the (centred) K vectors of each KV head [Hkv, D, D], and
    qcov    the second moment of the queries of its query group [Hkv, D, D] (after RoPE): the
            Q/K balance variants ("bal", "balrot", "whiten") are derived from the two.
    kmax, qmax  per layer, max |k - mean| and max |q| per channel [Hkv, D] ("balmax").
    vsq     per layer, the mean square of V per channel [Hkv, D] ("vbal").
    vmom    per layer, the second-moment matrix of V [Hkv, D, D] ("vwhiten").

Computed once per (model, block size, calibration texts, tokens) and cached under
~/.cache/sawtrt/eval/. The texts: 'calib' by default (the same-source protocol); the held-out
protocol passes sawtrt.data.corpus.CALIB_SOURCES (three genres, disjoint from the eval text).
"""
from __future__ import annotations

import torch

from .. import hadamard
from ..data.corpus import windows
from .hf_models import cache_root
from .hooks import KVHook
from .runner import window_nll


def kv_calibration(calib: dict, shrink: float = 0.0):
    """The served K calibration (sawtrt.models.kv_transform.KVCalibration: k_mean, k_rms with
    the mean, q_rms) from these statistics, for the fake and hf-paged paths. The same
    quantities `sawtrt build` computes with sawtrt's own model on the same text."""
    from ..models.kv_transform import KVCalibration
    layers = sorted(calib["means"])
    mean = torch.stack([calib["means"][i][:, 0] for i in layers])              # [L, Hkv, D]
    k_sq = torch.stack([calib["kcov"][i].diagonal(dim1=-2, dim2=-1) for i in layers]) + mean ** 2
    q_sq = torch.stack([calib["qcov"][i].diagonal(dim1=-2, dim2=-1) for i in layers])
    k_moment = torch.stack([calib["kcov"][i] + calib["means"][i].transpose(1, 2)
                            @ calib["means"][i] for i in layers])
    q_moment = torch.stack([calib["qcov"][i] for i in layers])
    meta = {"source": f"{calib.get('sources', 'calib')} (transformers model)",
            "whiten_shrink": shrink}
    return KVCalibration(mean, k_sq.sqrt(), q_sq.sqrt(), meta, k_moment, q_moment)


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
              refresh: bool = False, sources=("calib",)) -> dict:
    """Statistics of `tokens` tokens of each of `sources` (names or corpus.Text), windows of
    `window`; cached per (model, block, the sources' hashes, tokens, window)."""
    import hashlib
    from ..data.corpus import get_text
    texts = [get_text(s) for s in sources]
    key = hashlib.sha256(" ".join(t.sha256 for t in texts).encode()).hexdigest()[:12]
    tag = "" if [t.name for t in texts] == ["calib"] else f"_{key}_w{window}"
    path = cache_root() / label / f"calib_h{block}_{tokens}{tag}.pt"
    if path.exists() and not refresh:
        out = torch.load(path, weights_only=True)
        if "vmom" in out:
            return out
    keys: dict[int, list] = {}
    values: dict[int, list] = {}
    queries: dict[int, list] = {}

    class Rec(KVHook):
        def __call__(self, module, q, k, v, scaling, sw):
            keys.setdefault(module.layer_idx, []).append(k[0].detach().float().clone())
            values.setdefault(module.layer_idx, []).append(v[0].detach().float().clone())
            queries.setdefault(module.layer_idx, []).append(q[0].detach().float().clone())
            return super().__call__(module, q, k, v, scaling, sw)

    ws, _ = windows(tokenizer, texts, tokens=tokens, window=window)
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
    kcov, qcov, kmax, qmax = {}, {}, {}, {}
    vsq = {layer: torch.cat(vs, 1).pow(2).mean(1) for layer, vs in values.items()}
    vmom = {layer: (lambda v: v.transpose(1, 2) @ v / v.shape[1])(torch.cat(vs, 1))
            for layer, vs in values.items()}
    for layer, ks in keys.items():
        kc = torch.cat(ks, 1) - means[layer]                     # [Hkv, T, D]
        q = torch.cat(queries[layer], 1)                          # [Hq, T, D]
        hkv, d = kc.shape[0], kc.shape[-1]
        q = q.reshape(hkv, -1, d)                                 # query group g -> KV head g // G
        kcov[layer] = kc.transpose(1, 2) @ kc / kc.shape[1]
        qcov[layer] = q.transpose(1, 2) @ q / q.shape[1]
        kmax[layer], qmax[layer] = kc.abs().amax(1), q.abs().amax(1)
    out = {"means": means, "vmeans": vmeans, "levels": lloyd_levels(torch.cat(us)), "block": block,
           "tokens": tokens, "kcov": kcov, "qcov": qcov, "kmax": kmax, "qmax": qmax, "vsq": vsq,
           "vmom": vmom, "sources": "+".join(t.name for t in texts)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out
