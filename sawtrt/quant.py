"""Token-wise asymmetric integer quantization and INT4 packing (the rule is in spec.py)."""
from __future__ import annotations

import torch

from .spec import CLAMP


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN/+-Inf -> 0 and finite values clamped to +-CLAMP."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(-CLAMP, CLAMP)


def _half_bits_step(h: torch.Tensor, up: bool) -> torch.Tensor:
    """The fp16 neighbour of every element of `h` towards +inf (up) or -inf; stepping up from
    the smallest negative subnormal gives +0 (what CUDA's __float2half_ru gives there)."""
    # a 0-dim tensor on h's device: nextafter does not take a CPU scalar tensor with CUDA input
    step = torch.nextafter(h, h.new_full((), float("inf") if up else float("-inf")))
    if up:      # nextafter gives -0 there; the cache stores +0
        step = torch.where(step == 0, 0.0, step)
    return step


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 <= x (x fp32, finite, inside fp16 range); like CUDA's __float2half_rd."""
    h = x.half()
    return torch.where(h.float() > x, _half_bits_step(h, up=False), h)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 >= x; like CUDA's __float2half_ru."""
    h = x.half()
    return torch.where(h.float() < x, _half_bits_step(h, up=True), h)


def quantize(x: torch.Tensor, bits: int):
    """Quantize the last dimension of `x` token-wise.

    Returns (codes uint8 [..., D] in [0, 2^bits - 1], scale fp16 [...], offset fp16 [...]).
    """
    levels = (1 << bits) - 1
    x = sanitize(x)
    offset = fp16_round_down(x.amin(-1))
    m = offset.float()
    scale = fp16_round_up((x.amax(-1) - m) / levels)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    codes = torch.round((x - m[..., None]) * inv[..., None]).clamp_(0, levels).to(torch.uint8)
    return codes, scale, offset


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x_hat = code * s + m in fp32."""
    return codes.float() * scale.float()[..., None] + offset.float()[..., None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] codes in [0, 15] -> [..., D/2] bytes; element 2j low nibble, 2j+1 high nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
