"""saw_linear (the skinny GEMM of decode steps) against an fp32 reference on the GPU.

Tolerance, stated: fp32 accumulation in another order, then one rounding to the output dtype:
|y - ref| <= u * |ref| + 2^-18 * (|x| |w|^T) elementwise (u = 2^-8 bf16, 2^-11 fp16; the second
term is a margin for the fp32 summation order, whose worst case K 2^-24 |x||w| it covers for
K <= 64; random signs keep the actual difference near sqrt(K) 2^-24). Inputs: fresh random data with outlier columns
in x, shapes that are not multiples of the warp / unroll tiles, strided x and y, outputs
poisoned with NaN and checked for writes outside [m, n].
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sawtrt.kernels import library
from sawtrt.kernels import linear as lin

pytestmark = pytest.mark.gpu

_LIB = library.try_load()
if not torch.cuda.is_available() or _LIB is None or not hasattr(_LIB, "saw_linear"):
    pytest.skip("needs a CUDA GPU and libsawtrt_kernels.so with saw_linear",
                allow_module_level=True)

DEV = torch.device("cuda")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _check(y, x, w, bias, what):
    ref = x.double() @ w.double().T
    if bias is not None:
        ref = ref + bias.double()
    mag = x.double().abs() @ w.double().abs().T
    err = (y.double() - ref).abs()
    bound = _U[y.dtype] * ref.abs() + 2.0 ** -18 * mag + 1e-30
    worst = (err / bound).max().item()
    assert torch.isfinite(y).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    assert worst <= 1.0, f"{what}: error {worst:.2f} x the bound"


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n, k", [(1, 8), (37, 24), (1000, 2568), (2560, 9728), (6144, 2560)])
def test_linear_matches_reference(dtype, m, n, k, with_bias):
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1000 * m + n + k)
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:max(1, k // 64)]] *= 50     # outlier channels
    w = (torch.randn(n, k, generator=gen) * k ** -0.5)
    bias = torch.randn(n, generator=gen) if with_bias else None
    # x as a view with a padded row stride, y written into a NaN-poisoned buffer one row and
    # three columns larger
    xbuf = torch.full((m, k + 16), float("nan"), dtype=dt)
    xbuf[:, :k] = x.to(dt)
    xbuf, w, bias = xbuf.to(DEV), w.to(dt).to(DEV), None if bias is None else bias.to(dt).to(DEV)
    xv = xbuf[:, :k]
    ybuf = torch.full((m + 1, n + 3), float("nan"), dtype=dt, device=DEV)
    assert lin.kernel_serves(xv, w, bias, max_rows=8)
    lin.skinny_linear(xv, w, bias, out=ybuf[:m, :n])
    torch.cuda.synchronize()
    _check(ybuf[:m, :n], xv, w, bias, f"m={m} n={n} k={k} {dtype}")
    assert torch.isnan(ybuf[:, n:]).all() and torch.isnan(ybuf[m]).all(), "wrote outside [m, n]"


def test_linear_op_dispatch_and_compile():
    """linear(): saw_linear at <= MAX_ROWS rows, cuBLAS above, the same values under
    torch.compile (the op is opaque to inductor) and inside a captured CUDA graph."""
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(3000, 512, generator=gen).to(dt).to(DEV)
    assert lin.MAX_ROWS >= 1
    for m in sorted({1, lin.MAX_ROWS, lin.MAX_ROWS + 1, 64}):
        x = torch.randn(m, 512, generator=gen).to(dt).to(DEV)
        want = lin.skinny_linear(x, w) if m <= lin.MAX_ROWS else F.linear(x, w)
        assert torch.equal(lin.linear(x, w), want), m
        fn = torch.compile(lambda a: lin.linear(a, w) * 2)
        assert torch.equal(fn(x), want * 2), m
    x = torch.randn(1, 512, generator=gen).to(dt).to(DEV)
    static_out = lin.linear(x, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = lin.linear(x, w)
    x.copy_(torch.randn(1, 512, generator=gen).to(dt))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, lin.skinny_linear(x, w))
