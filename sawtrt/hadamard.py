"""Block-diagonal Hadamard rotation (BDR), the "R" of SAW-INT4.

The head dimension D is split into contiguous blocks of h channels (h a power of two,
16 <= h <= 256, h | D). Each block is multiplied by the orthonormal Sylvester Hadamard
matrix H_h / sqrt(h), computed as a fast Walsh-Hadamard transform (log2(h) butterfly
stages, never a dense matmul). Optional fixed +-1 signs are applied *before* the transform:

    rotate(x)  = FWHT_h(x * sigma) / sqrt(h)
    inverse(y) = FWHT_h(y) / sqrt(h) * sigma          (H is symmetric and H @ H = h * I)

Because the map is orthogonal, q . k == rotate(q) . rotate(k): the query is rotated once per
token and the cache is never un-rotated. The CUDA version lives in cpp/include/saw/hadamard.cuh
and uses the same butterfly order, so both agree to fp32 rounding.
"""
from __future__ import annotations

import math

import torch

MIN_BLOCK = 16
MAX_BLOCK = 256


class RotationError(ValueError):
    """A rotation block that does not fit the head dimension."""


def check_block(head_dim: int, block: int) -> None:
    """Raise RotationError unless `block` is a legal BDR block for `head_dim`."""
    if block < MIN_BLOCK or block > MAX_BLOCK or block & (block - 1):
        raise RotationError(
            f"rotation block h={block} must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}]")
    if head_dim % block:
        raise RotationError(f"rotation block h={block} does not divide head_dim D={head_dim}")


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over each contiguous block of `block` channels.

    Butterfly stage s pairs channel i with i + 2**s inside a block (a, b) -> (a + b, a - b),
    which is the Sylvester ordering H_2n = [[H_n, H_n], [H_n, -H_n]].
    """
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    stride = 1
    while stride < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * stride), 2, stride)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        stride *= 2
    return y.reshape(shape)


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Dense Sylvester Hadamard matrix (entries +-1); for tests only."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def rotate(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Apply BDR to the last dimension. Computes in fp32 (fp64 stays fp64); returns that dtype."""
    check_block(x.shape[-1], block)
    y = x.double() if x.dtype == torch.float64 else x.float()
    if signs is not None:
        y = y * signs.to(device=y.device, dtype=y.dtype)
    return fwht(y, block) * (1.0 / math.sqrt(block))


def inverse_rotate(y: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `rotate` (its transpose)."""
    check_block(y.shape[-1], block)
    x = y.double() if y.dtype == torch.float64 else y.float()
    x = fwht(x, block) * (1.0 / math.sqrt(block))
    if signs is not None:
        x = x * signs.to(device=x.device, dtype=x.dtype)
    return x
