"""K/Q statistics of a transformers model for the served K transforms (center / balance= /
whiten), on text disjoint from the evaluation text; `kv_calibration` turns them into the
KVCalibration the fake and hf-paged paths apply.

    means   per layer, the mean K vector (after RoPE) of each KV head over the calibration
            tokens: [Hkv, 1, D].
    kcov    per layer, the covariance of the (centred) K vectors of each KV head [Hkv, D, D], and
    qcov    the second moment of the queries of its query group [Hkv, D, D] (after RoPE).

Computed once per (model, block size, calibration texts, tokens) and cached under
~/.cache/sawtrt/eval/. The texts: 'calib' by default (the same-source protocol); the held-out
protocol passes sawtrt.data.corpus.CALIB_SOURCES (three genres, disjoint from the eval text).
"""
from __future__ import annotations

import torch

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


def calibrate(model, tokenizer, label: str, block: int, tokens: int = 1024, window: int = 512,
              refresh: bool = False, sources=("calib",)) -> dict:
    """Statistics of `tokens` tokens of each of `sources` (names or corpus.Text), windows of
    `window`; cached per (model, block, the sources' hashes, tokens, window). The statistics do
    not depend on `block`: it stays in the file name so that existing cache files are found."""
    import hashlib
    from ..data.corpus import get_text
    texts = [get_text(s) for s in sources]
    key = hashlib.sha256(" ".join(t.sha256 for t in texts).encode()).hexdigest()[:12]
    tag = "" if [t.name for t in texts] == ["calib"] else f"_{key}_w{window}"
    path = cache_root() / label / f"calib_h{block}_{tokens}{tag}.pt"
    if path.exists() and not refresh:
        out = torch.load(path, weights_only=True)
        # older files also hold statistics of the prototypes that left; these three are
        # computed as they were (files from before kcov / qcov existed are recomputed)
        if {"means", "kcov", "qcov"} <= out.keys():
            return out
    keys: dict[int, list] = {}
    queries: dict[int, list] = {}

    class Rec(KVHook):
        def __call__(self, module, q, k, v, scaling, sw):
            keys.setdefault(module.layer_idx, []).append(k[0].detach().float().clone())
            queries.setdefault(module.layer_idx, []).append(q[0].detach().float().clone())
            return super().__call__(module, q, k, v, scaling, sw)

    ws, _ = windows(tokenizer, texts, tokens=tokens, window=window)
    hook = Rec("bf16", mode="fake")
    for w in ws:
        with hook.attach(model):
            window_nll(model, w)
    means, kcov, qcov = {}, {}, {}
    for layer, ks in keys.items():
        k = torch.cat(ks, 1)                     # [Hkv, T, D]
        means[layer] = k.mean(1, keepdim=True)
        kc = k - means[layer]
        q = torch.cat(queries[layer], 1)                          # [Hq, T, D]
        hkv, d = kc.shape[0], kc.shape[-1]
        q = q.reshape(hkv, -1, d)                                 # query group g -> KV head g // G
        kcov[layer] = kc.transpose(1, 2) @ kc / kc.shape[1]
        qcov[layer] = q.transpose(1, 2) @ q / q.shape[1]
    out = {"means": means, "block": block, "tokens": tokens, "kcov": kcov, "qcov": qcov,
           "sources": "+".join(t.name for t in texts)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out
