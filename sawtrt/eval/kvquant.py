"""Fake quantization of K/V by the project's spec, plus eval-only ablations.

`KVScheme` = a `sawtrt.spec.KVPolicy` (the served format, parsed by `KVPolicy.parse`: bits,
rotation block, V rotation, signs, the K transforms center / balance= / whiten, per-layer
int8= / bf16= pages) plus eval-only options that measure a part of the error and are not a
cache format. Written "POLICY[@OPTION...]" (`parse_scheme`), e.g.

    int4-bdr:h=64,kv,center,whiten   the served policy, exactly as spec.py defines it
    int4-bdr:h=64@konly              only K in the policy, V kept bf16 (ablation)
    int4@vonly                       only V in the policy, K kept bf16 (ablation)
    int4-bdr:h=64,center@v8          V stored int8 in every layer (an upper-bound check)

The @variants of earlier measurements are refused by the parser: those that became policy
options (`@center` -> `center`, `@bal=A` / `@balraw=A` -> `balance=A`, `@whiten` / `@whitenraw` ->
`whiten`, `@k8=L+L` -> `int8=L+L`) name the option to write instead; those measured not to help
(`clip`, `lut`, `vcenter`, `balmax`, `balrot`, `vbal`, `vwhiten`) are no longer in sawtrt.
What each measured: CHANGELOG.md (Accuracy), linked from docs/accuracy.md.

Shapes: every function takes x [..., D] (the last dimension is the head dimension) and returns a
fp32 tensor of the same shape, in the *original* basis: x_hat = R^T Q(R x). For the served policy
this is exactly what `sawtrt.kv_cache.encode` + `decode` store and read back (same sanitize,
rotation, directed fp16 rounding of (s, m), round-half-even codes), so the fake-quant path and the
paged-cache path differ only in fp32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import hadamard, quant
from ..spec import KVPolicy, PolicyError, split_policy_list


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


def quantize_dequant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Token-wise asymmetric quantization of the last dim, returned dequantized (fp32):
    bit-identical to `sawtrt.quant.quantize` + `dequantize` of the sanitized x."""
    codes, scale, offset = quant.quantize(quant.sanitize(x), bits)
    return quant.dequantize(codes, scale, offset)


def fake_quant(x: torch.Tensor, policy: KVPolicy, which: str, mean: torch.Tensor | None = None,
               kmat: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., Hkv, T, D] or [..., D] after RoPE -> what the cache gives back, in x's basis (fp32).

    which: "k" or "v" (V is rotated only with policy.rotate_v). mean: [Hkv, 1, D] or [D] channel
    mean subtracted before rotation and added back after (the policy's `center`). kmat: (A, A^-1)
    [Hkv, D, D]: x - mean is mapped to A (x - mean) before the rotation and back after (the
    policy's `balance=` / `whiten`; the query then sees A^-T q, so the scores are exact).
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
    y = quantize_dequant(y, policy.bits)
    if rotated:
        y = hadamard.inverse_rotate(y, policy.rotation_block, signs)
    if kmat is not None:
        y = y @ kmat[1].transpose(-1, -2)
    if mean is not None:
        y = y + mean
    return y
