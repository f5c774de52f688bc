"""Fake quantization of K/V by the project's spec, plus eval-only ablations.

`KVScheme` = a `sawtrt.spec.KVPolicy` (the served format, parsed by `KVPolicy.parse`: bits,
rotation block, V rotation, signs, the K transforms center / balance= / whiten, per-layer
int8= / bf16= pages) plus eval-only options that measure a part of the error and are not a
cache format. Written "POLICY[@OPTION...]" (`parse_scheme`), e.g.

    int4-bdr:h=64,kv,center,whiten   the served policy, exactly as spec.py defines it
    int4-bdr:h=64@konly              only K in the policy, V kept bf16 (ablation)
    int4@vonly                       only V in the policy, K kept bf16 (ablation)
    int4-bdr:h=64,center@v8          V stored int8 in every layer (an upper-bound check)

The write-side prototypes that were measured (docs/accuracy.md) either became
policy options (`@center` -> `center`, `@bal=A` / `@balraw=A` -> `balance=A`, `@whiten` /
`@whitenraw` -> `whiten`, `@k8=L+L` -> `int8=L+L`) or did not help (`clip`, `lut`, `vcenter`,
`balmax`, `balrot`, `vbal`, `vwhiten`); the parser refuses both kinds and names the replacement.
The code behind the refused prototypes (clip / levels in `quantize_dequant`, the balmax / balrot
branches of `balance_matrices`, `v_balance`, `v_whitening`, and their branches in hooks.py and
calibrate.py) is unreachable from any scheme now and is to be deleted with those branches.

Shapes: every function takes x [..., D] (the last dimension is the head dimension) and returns a
fp32 tensor of the same shape, in the *original* basis: x_hat = R^T Q(R x). For the served policy
this is exactly what `sawtrt.kv_cache.encode` + `decode` store and read back (same sanitize,
rotation, directed fp16 rounding of (s, m), round-half-even codes), so the fake-quant path and the
paged-cache path differ only in fp32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import hadamard, quant
from ..models.kv_transform import whitening
from ..spec import KVPolicy, PolicyError, split_policy_list

# Shrink ratios tried per token by the "clip" variant (1.0 = the spec's min/max range).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def split_schemes(text: str) -> list[str]:
    """"fp32,bf16,int4-bdr:h=32,kv,seed=1@konly,int4" -> one string per scheme (spec's rule)."""
    return split_policy_list(text)


EVAL_OPTIONS = ("konly", "vonly", "v8")
# the @variants of earlier measurements: the policy option that serves each, or why it left
SERVED_AS = {"center": "center", "bal": "balance", "balraw": "balance", "whiten": "whiten",
             "whitenraw": "whiten", "k8": "int8"}
LEFT = ("clip", "lut", "vcenter", "balmax", "balrot", "vbal", "vwhiten")


def parse_scheme(text: str) -> "KVScheme":
    """The one parser of eval's schemes: KVPolicy.parse for the policy, then the eval-only
    options after '@'."""
    base, *extras = [p.strip() for p in text.strip().split("@")]
    kw: dict = {}
    served: list[str] = []
    for opt in extras:
        key, eq, val = opt.partition("=")
        if opt in ("konly", "vonly"):
            if "only" in kw:
                raise PolicyError(f"{text!r}: give one of konly, vonly")
            kw["only"] = opt[0]
        elif opt == "v8":
            kw["v8"] = True
        elif key in SERVED_AS:
            served.append(SERVED_AS[key] + (f"={val}" if eq else ""))
        elif key in LEFT:
            raise PolicyError(f"{text!r}: the @{key} prototype was measured not to help "
                              "(docs/accuracy.md) and is no longer in sawtrt")
        else:
            raise PolicyError(f"unknown eval option {opt!r} in {text!r} (eval-only options: "
                              f"{', '.join(EVAL_OPTIONS)}; everything else is the policy's)")
    if served:
        rest = [o for o in extras if o in EVAL_OPTIONS]
        raise PolicyError(f"{text!r}: {', '.join(served)} are policy options now: write "
                          + base + ("," if ":" in base else ":") + ",".join(served)
                          + "".join("@" + o for o in rest))
    return KVScheme(KVPolicy.parse(base), text=text.strip(), **kw)


@dataclass(frozen=True)
class KVScheme:
    policy: KVPolicy
    only: str | None = None          # "k" or "v": the other tensor stays bf16
    v8: bool = False                 # V stored as int8 in every layer (K as the policy says)
    text: str = field(default="", compare=False)

    # The prototypes that left: always off (hooks.py still asks for them).
    clip: ClassVar[bool] = False
    lut: ClassVar[bool] = False
    center: ClassVar[bool] = False
    vcenter: ClassVar[bool] = False
    int8_layers: ClassVar[tuple] = ()
    balance: ClassVar[str | None] = None
    alpha: ClassVar[float] = 0.5
    vbal: ClassVar[float | None] = None
    vwhiten: ClassVar[bool] = False

    @classmethod
    def parse(cls, text: str) -> "KVScheme":
        return parse_scheme(text)

    @property
    def is_plain(self) -> bool:
        """True when this is exactly a served policy (no eval-only option)."""
        return not (self.only or self.v8)

    @property
    def calibrated(self) -> bool:
        """True when the scheme needs the model's calibration (the policy's K transform)."""
        return self.policy.transforms_k

    def __str__(self) -> str:
        return self.text or str(self.policy)

    def policy_for_layer(self, layer: int) -> KVPolicy:
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
