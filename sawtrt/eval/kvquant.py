"""Fake quantization of K/V by the project's spec, plus prototype variants (eval only).

`KVScheme` = a `sawtrt.spec.KVPolicy` (the served format: bits, rotation block, V rotation,
signs) plus optional *variants* that keep the system constraints of the paged cache (same page
table, per-token (s, m) fp16 parameters, no extra passes over the cache). Written as
"POLICY[@VARIANT[@VARIANT...]]", e.g.

    int4-bdr:h=64                 the served policy, exactly as spec.py defines it
    int4-bdr:h=64@clip            per token, the range [m, m + 15 s] that minimises the MSE among
                                  a few shrink ratios of [min, max] (tried at write time)
    int4-bdr:h=64@lut             K only: 16 non-uniform levels between min and max instead of
                                  16 equidistant ones (a fixed table fitted by calibrate.py)
    int4-bdr:h=64@center          K minus a fixed per-layer, per-KV-head channel mean before the
                                  rotation (softmax is invariant to it: q.(k - mu) = q.k - q.mu)
    int4-bdr:h=64@k8=0+1          layers 0 and 1 store K and V as int8 (pages are per layer)
    int4-bdr:h=64@vcenter         V minus a fixed per-layer channel mean, added back to the
                                  attention output once (sum p = 1 makes that exact)
    int4-bdr:h=64@v8              V as int8 in every layer (more bytes; an upper-bound check)
    int4-bdr:h=64@center@bal=0.5  Q/K balance: k -> k / s, q -> q * s per channel (exact for the
                                  scores), s_c = (rms k_c / rms q_c)^alpha over the calibration
                                  text (K centred when @center), geometric mean 1; before BDR
    ...@balmax=0.5                the same with max |k_c| / max |q_c|
    ...@balrot=0.5                the same on the channels of the BDR-rotated K and q
                                  (k -> R^T S^-1 R k: a block-diagonal matrix, not a scale)
    ...@whiten                    k -> A k, q -> A^-T q with the A minimising
                                  E|A^-T q|^2 * E|A k|^2 (A^T A = the geometric mean of Sigma_k^-1
                                  and Sigma_q): the full-matrix form of bal=0.5
    ...@center@balraw=0.5         centring, then the balance with s from K's statistics *with*
    ...@center@whitenraw          its mean (likewise the matrix): the served policies
                                  int4-bdr:h=64,center,balance=0.5 / int4-bdr:h=64,center,whiten
    ...@vbal=0.5                  V balance: v -> v / t per channel, the attention output times t
                                  (foldable into v_proj rows and o_proj columns: free when
                                  served), t_c = (rms v_c / |o_proj columns of c|)^alpha
    ...@vwhiten                   its full-matrix form: v -> B v, output -> B^-1 o (also
                                  foldable), B^2 = Sigma_v^-1 # (o_proj block Gram of the group)
    int4@vonly, int4-bdr@konly    only V (only K) in the policy, the other one bf16 (ablation)

Shapes: every function takes x [..., D] (the last dimension is the head dimension) and returns a
fp32 tensor of the same shape, in the *original* basis: x_hat = R^T Q(R x). For the served policy
this is exactly what `sawtrt.kv_cache.encode` + `decode` store and read back (same sanitize,
rotation, directed fp16 rounding of (s, m), round-half-even codes), so the fake-quant path and the
paged-cache path differ only in fp32 summation order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import hadamard, quant
from ..models.kv_transform import whitening
from ..spec import KVPolicy, PolicyError, split_policy_list

# Shrink ratios tried per token by the "clip" variant (1.0 = the spec's min/max range).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def split_schemes(text: str) -> list[str]:
    """"fp32,bf16,int4-bdr:h=32,kv,seed=1@clip,int4" -> one string per scheme (spec's rule)."""
    return split_policy_list(text)


@dataclass(frozen=True)
class KVScheme:
    policy: KVPolicy
    clip: bool = False
    lut: bool = False
    center: bool = False
    vcenter: bool = False
    int8_layers: tuple[int, ...] = ()
    only: str | None = None          # "k" or "v": the other tensor stays bf16
    v8: bool = False                 # V stored as int8 in every layer (K as the policy says)
    balance: str | None = None       # "bal" | "balmax" | "balrot" | "balraw" | "whiten" |
                                     # "whitenraw" (see module doc)
    alpha: float = 0.5
    vbal: float | None = None        # alpha of the V balance (see module doc)
    vwhiten: bool = False
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> "KVScheme":
        base, *variants = [p.strip() for p in text.strip().split("@")]
        kw: dict = {}
        for v in variants:
            key, eq, val = v.partition("=")
            if key == "clip" and not eq:
                kw["clip"] = True
            elif key == "lut" and not eq:
                kw["lut"] = True
            elif key == "center" and not eq:
                kw["center"] = True
            elif key == "vcenter" and not eq:
                kw["vcenter"] = True
            elif key == "v8" and not eq:
                kw["v8"] = True
            elif key in ("konly", "vonly") and not eq:
                kw["only"] = key[0]
            elif key in ("bal", "balmax", "balrot", "balraw") and eq:
                kw["balance"], kw["alpha"] = key, float(val)
            elif key == "vbal" and eq:
                kw["vbal"] = float(val)
            elif key == "vwhiten" and not eq:
                kw["vwhiten"] = True
            elif key in ("whiten", "whitenraw") and not eq:
                kw["balance"] = key
            elif key == "k8" and eq:
                kw["int8_layers"] = tuple(sorted(int(x) for x in val.split("+") if x.strip()))
            else:
                raise PolicyError(f"unknown variant {v!r} in {text!r} (clip, lut, center, vcenter, "
                                  "konly, vonly, v8, k8=L+L.., bal=A, balmax=A, balrot=A, balraw=A, "
                                  "whiten, whitenraw, vbal=A)")
        scheme = cls(KVPolicy.parse(base), text=text.strip(), **kw)
        if (scheme.clip or scheme.lut) and not scheme.policy.quantized:
            raise PolicyError(f"{text!r}: clip/lut need a quantized policy")
        return scheme

    @property
    def is_plain(self) -> bool:
        """True when this is exactly a served policy (no prototype variant)."""
        return not (self.clip or self.lut or self.center or self.vcenter or self.int8_layers
                    or self.only or self.v8 or self.balance or self.vbal or self.vwhiten)

    @property
    def calibrated(self) -> bool:
        """True when the scheme needs calibration statistics (calibrate.py)."""
        return bool(self.center or self.lut or self.vcenter or self.balance or self.vbal
                    or self.vwhiten                    or self.policy.transforms_k)

    def __str__(self) -> str:
        return self.text or str(self.policy)

    def policy_for_layer(self, layer: int) -> KVPolicy:
        if layer in self.int8_layers:
            return KVPolicy("int8")
        return self.policy.for_layer(layer)       # the served per-layer pages (int8=...)

    def policy_for(self, layer: int, which: str) -> KVPolicy:
        """The policy K ("k") or V ("v") of `layer` is stored in."""
        if self.only is not None and which != self.only:
            return KVPolicy("bf16")
        if self.v8 and which == "v":
            return KVPolicy("int8")
        return self.policy_for_layer(layer)

    def cache_bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of K+V cache per token over all layers (codes + in-page params)."""
        from ..spec import PageLayout
        total = 0
        for layer in range(num_layers):
            for which in "kv":
                lay = PageLayout(self.policy_for(layer, which), head_dim, num_kv_heads)
                total += lay.code_bytes + lay.param_bytes
        return total * num_kv_heads


def quantize_dequant(x: torch.Tensor, bits: int, clip: bool = False,
                     levels: torch.Tensor | None = None) -> torch.Tensor:
    """Token-wise asymmetric quantization of the last dim, returned dequantized (fp32).

    Plain (clip=False, levels=None) is bit-identical to `sawtrt.quant.quantize` + `dequantize`.
    clip: per token, try the ranges [c - r w/2, c + r w/2] (c, w the centre and width of
    [min, max], r in CLIP_RATIOS), keep the one with the smallest squared error.
    levels: 2^bits increasing values in [0, 1]; x_hat = m + s_full * levels[code] with
    s_full = (max - min) (stored as s = s_full / L to keep the param format), nearest level.
    """
    L = (1 << bits) - 1
    x = quant.sanitize(x)
    if levels is None and not clip:
        codes, scale, offset = quant.quantize(x, bits)
        return quant.dequantize(codes, scale, offset)
    lo, hi = x.amin(-1), x.amax(-1)
    best, best_err = None, None
    ratios = CLIP_RATIOS if clip else (1.0,)
    for r in ratios:
        c, w = (lo + hi) * 0.5, (hi - lo) * (0.5 * r)
        m = quant.fp16_round_down(c - w).float()
        s = quant.fp16_round_up(((c + w) - m) / L).float()
        if levels is None:
            inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)),
                              torch.zeros_like(s))
            code = torch.round((x - m[..., None]) * inv[..., None]).clamp_(0, L)
            xh = code * s[..., None] + m[..., None]
        else:
            span = (s * L)[..., None]
            u = (x - m[..., None]) / torch.where(span > 0, span, torch.ones_like(span))
            mids = (levels[1:] + levels[:-1]) * 0.5
            code = torch.bucketize(u.clamp(0, 1).contiguous(), mids)
            xh = levels[code] * span + m[..., None]
        err = (xh - x).pow(2).sum(-1)
        if best is None:
            best, best_err = xh, err
        else:
            take = err < best_err
            best = torch.where(take[..., None], xh, best)
            best_err = torch.where(take, err, best_err)
    return best


def balance_matrices(scheme: KVScheme, calib: dict, layer: int, d: int
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, A^-1) [Hkv, D, D] of the scheme's K transform k -> A k (q -> A^-T q), or None."""
    if not scheme.balance:
        return None
    kcov, qcov = calib["kcov"][layer].double(), calib["qcov"][layer].double()
    if not scheme.center or scheme.balance.endswith("raw"):   # stats of K with its mean
        mu = calib["means"][layer].double()       # [Hkv, 1, D]
        kcov = kcov + mu.transpose(1, 2) @ mu
    if scheme.balance.startswith("whiten"):
        a = whitening(kcov, qcov)
        return a, torch.linalg.inv(a.double()).float()
    if scheme.balance == "balmax":
        kstat = calib["kmax"][layer].double()
        if not scheme.center:
            kstat = kstat + calib["means"][layer][:, 0].double().abs()
        qstat = calib["qmax"][layer].double()
    else:
        kstat = kcov.diagonal(dim1=-2, dim2=-1).sqrt()
        qstat = qcov.diagonal(dim1=-2, dim2=-1).sqrt()
    r = None
    if scheme.balance == "balrot":
        pol = scheme.policy.resolve(d)
        eye = torch.eye(d)
        r = hadamard.rotate(eye, pol.rotation_block, pol.signs(d)).double()   # rows: R e_i
        # R x = x @ r for row vectors; channel variances of the rotated vectors
        kstat = (r.T @ kcov @ r).diagonal(dim1=-2, dim2=-1).sqrt()
        qstat = (r.T @ qcov @ r).diagonal(dim1=-2, dim2=-1).sqrt()
    s = (kstat / qstat.clamp_min(1e-12)).clamp_min(1e-12).pow(scheme.alpha)
    s = s / s.log().mean(-1, keepdim=True).exp()            # geometric mean 1 per head
    a, ai = torch.diag_embed(1 / s), torch.diag_embed(s)
    if r is not None:                                         # A = R^T S^-1 R on row vectors
        a, ai = r @ a @ r.T, r @ ai @ r.T
    # row-vector convention: k' = k @ a^T; return (A, A^-1) as column-vector matrices
    return a.float(), ai.float()


def v_balance(calib: dict, layer: int, o_proj: torch.Tensor, alpha: float) -> torch.Tensor:
    """t [Hkv, D]: (rms v_c / w_c)^alpha, geometric mean 1, w_c^2 the squared norm of the o_proj
    columns that channel c of the KV head reaches (all query heads of its group)."""
    vrms = calib["vsq"][layer].double().sqrt()                              # [Hkv, D]
    hkv, d = vrms.shape
    w = o_proj.double().pow(2).sum(0).reshape(hkv, -1, d).sum(1).sqrt()      # [Hkv, D]
    t = (vrms / w.clamp_min(1e-12)).clamp_min(1e-12).pow(alpha)
    return (t / t.log().mean(-1, keepdim=True).exp()).float()


def v_whitening(calib: dict, layer: int, o_proj: torch.Tensor) -> tuple:
    """(B, B^-1) [Hkv, D, D] of the vwhiten variant."""
    vmom = calib["vmom"][layer].double()
    hkv, d = vmom.shape[0], vmom.shape[-1]
    w = o_proj.double().reshape(o_proj.shape[0], hkv, -1, d)              # [hidden, Hkv, G, D]
    gram = torch.einsum("ngkd,ngke->gde", w, w)
    b = whitening(vmom, gram)
    return b, torch.linalg.inv(b.double()).float()


def fake_quant(x: torch.Tensor, policy: KVPolicy, which: str, scheme: KVScheme | None = None,
               mean: torch.Tensor | None = None, levels: torch.Tensor | None = None,
               kmat: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., Hkv, T, D] or [..., D] after RoPE -> what the cache gives back, in x's basis (fp32).

    which: "k" or "v" (V is rotated only with policy.rotate_v). mean: [Hkv, 1, D] or [D] channel
    mean subtracted before rotation and added back after (the "center" variant). kmat: (A, A^-1)
    [Hkv, D, D]: x - mean is mapped to A (x - mean) before the rotation and back after (the
    balance variants; the query then sees A^-T q, so the scores are exact).
    """
    if not policy.quantized:
        return quant.sanitize(x).bfloat16().float()
    d = x.shape[-1]
    policy = policy.resolve(d)
    rotated = policy.rotated and (which == "k" or policy.rotate_v)
    y = quant.sanitize(x)
    if mean is not None:
        y = y - mean
    if kmat is not None:
        y = y @ kmat[0].transpose(-1, -2)
    signs = policy.signs(d) if rotated else None
    if rotated:
        y = hadamard.rotate(y, policy.rotation_block, signs)
    clip = scheme.clip if scheme else False
    lv = levels if (scheme and scheme.lut and which == "k") else None
    y = quantize_dequant(y, policy.bits, clip=clip, levels=lv)
    if rotated:
        y = hadamard.inverse_rotate(y, policy.rotation_block, signs)
    if kmat is not None:
        y = y @ kmat[1].transpose(-1, -2)
    if mean is not None:
        y = y + mean
    return y
