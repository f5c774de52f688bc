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

from sawtrt.kernels import library
from sawtrt.kernels import linear as lin

pytestmark = pytest.mark.gpu

_LIB = library.try_load()
if not torch.cuda.is_available() or _LIB is None or not hasattr(_LIB, "saw_linear_fused"):
    pytest.skip("needs a CUDA GPU and libsawtrt_kernels.so with saw_linear_fused",
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
# (2560, 4096) and (2560, 9728): rows shared by 2 and 4 warps at m >= 2 on the H200 (two CTAs
# per SM; linear.cu PickSlices); test_linear_row_split covers one row
@pytest.mark.parametrize("n, k", [(1, 8), (37, 24), (1000, 2568), (2560, 4096), (2560, 9728),
                                  (6144, 2560)])
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


@pytest.mark.parametrize("variant", ["plain", "glu", "norm_residual"])
def test_op_dispatch_and_compile(variant):
    """linear() / linear_glu(): the kernel at <= MAX_ROWS rows, the plain ops above (cuBLAS,
    bit-equal to them), the same values under torch.compile (the op is opaque to inductor) and
    inside a captured CUDA graph. Above MAX_ROWS inductor fuses the elementwise work around the
    product with fewer roundings than the eager ops (silu * up; the RMSNorm, the residual add),
    so there only the eager call is compared."""
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(7 + len(variant))
    w = torch.randn(3000, 512, generator=gen).to(dt).to(DEV)
    glu, fused = variant == "glu", variant == "norm_residual"
    width = 1024 if glu else 512
    norm_w = (torch.rand(512, generator=gen) + 0.5).to(dt).to(DEV)

    def extra(m):
        res = torch.randn(m, 3000, generator=gen).to(dt).to(DEV)
        return dict(norm_weight=norm_w, eps=1e-6, residual=res) if fused else {}

    def op(a, **kw):
        return lin.linear_glu(a, w) if glu else lin.linear(a, w, **kw)

    def kernel(a, **kw):
        return lin.skinny_linear(a, w, glu=glu, **kw)

    assert lin.MAX_ROWS >= 1
    for m in sorted({1, lin.MAX_ROWS, lin.MAX_ROWS + 1, 64}):
        x = torch.randn(m, width, generator=gen).to(dt).to(DEV)
        kw = extra(m)
        want = kernel(x, **kw) if m <= lin.MAX_ROWS else lin._plain(x, w, glu=glu, **kw)
        assert torch.equal(op(x, **kw), want), m
        if m <= lin.MAX_ROWS or variant == "plain":
            fn = torch.compile(lambda a: op(a, **kw) * 2)
            assert torch.equal(fn(x), want * 2), m
    x = torch.randn(1, width, generator=gen).to(dt).to(DEV)
    kw = extra(1)
    static_out = op(x, **kw)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = op(x, **kw)
    x.copy_(torch.randn(1, width, generator=gen).to(dt))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, kernel(x, **kw))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(37, 24), (1000, 2568), (2560, 4096), (9728, 2560)])
def test_linear_norm_residual_matches_reference(dtype, m, n, k):
    """residual + rms_norm(x, g) w^T + bias. The staged row is compared first, then the product
    with _check's bound on the normalized x (the kernel's rsqrt and the reference's differ by
    an ulp, which may move a staged element across a rounding: two such elements allowed per
    row, as in the GLU test), then the add: the projection rounded, then the sum rounded."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(7000 * m + n + k)
    x = torch.randn(m, k, generator=gen) * 3
    x[:, torch.randperm(k, generator=gen)[:max(1, k // 64)]] *= 40     # outlier channels
    g = torch.rand(k, generator=gen) * 2
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    bias = torch.randn(n, generator=gen)
    res = torch.randn(m, n, generator=gen) * 4
    x, g, w, bias, res = (t.to(dt).to(DEV) for t in (x, g, w, bias, res))
    ybuf = torch.full((m + 1, n + 3), float("nan"), dtype=dt, device=DEV)
    assert lin.kernel_serves(x, w, bias, max_rows=8, norm_weight=g, residual=res)
    lin.skinny_linear(x, w, bias, out=ybuf[:m, :n], norm_weight=g, eps=1e-6, residual=res)
    torch.cuda.synchronize()
    h = lin.rms_norm(x, g, 1e-6)
    proj = h.double() @ w.double().T + bias.double()
    mag = h.double().abs() @ w.double().abs().T
    flips = 2 * (2 * _U[dt]) * h.double().abs().amax(-1, keepdim=True) \
        * w.double().abs().amax(-1)[None]
    # the projection's own error budget, then the add's rounding of the (rounded) sum
    proj_bound = _U[dt] * proj.abs() + 2.0 ** -18 * mag + flips
    ref = res.double() + proj
    bound = proj_bound * (1 + _U[dt]) + _U[dt] * (ref.abs() + proj_bound) + 1e-30
    y = ybuf[:m, :n].double()
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite outputs"
    worst = ((y - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f} x bound"
    assert torch.isnan(ybuf[:, n:]).all() and torch.isnan(ybuf[m]).all(), "wrote outside [m, n]"
    # in place: the residual may be y itself
    inplace = res.clone()
    lin.skinny_linear(x, w, bias, out=inplace, norm_weight=g, eps=1e-6, residual=inplace)
    torch.cuda.synchronize()
    assert torch.equal(inplace, ybuf[:m, :n])


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n, k", [(1500, 8192), (500, 8192), (64, 16384)])
def test_linear_row_split(m, n, k):
    """Rows shared by several warps (partial sums through shared memory, a named barrier per
    group): on the H200 these shapes take 2, 4 and 8 warps a row at one row (three CTAs per SM,
    3168 warps) and 4, 4 and 8 at three rows (two CTAs per SM, 2112 warps). Against the reference with the norm and the
    residual (both read around the shared rows), and bit-identical over repeated launches (a
    barrier race would show as run-to-run differences)."""
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(9000 * m + n + k)
    x = torch.randn(m, k, generator=gen) * 2
    x[:, torch.randperm(k, generator=gen)[:k // 64]] *= 30
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    x, w = x.to(dt).to(DEV), w.to(dt).to(DEV)
    ybuf = torch.full((m + 1, n + 3), float("nan"), dtype=dt, device=DEV)
    assert lin.kernel_serves(x, w, max_rows=8)
    lin.skinny_linear(x, w, out=ybuf[:m, :n])
    torch.cuda.synchronize()
    _check(ybuf[:m, :n], x, w, None, f"m={m} n={n} k={k}")
    assert torch.isnan(ybuf[:, n:]).all() and torch.isnan(ybuf[m]).all(), "wrote outside [m, n]"
    g = (torch.rand(k, generator=gen) + 0.5).to(dt).to(DEV)
    res = torch.randn(m, n, generator=gen).to(dt).to(DEV)
    runs = [lin.skinny_linear(x, w, norm_weight=g, eps=1e-6, residual=res) for _ in range(5)]
    torch.cuda.synchronize()
    assert all(torch.equal(r, runs[0]) for r in runs[1:]), "repeated launches differ"
    want = res.float() + lin.skinny_linear(x, w, norm_weight=g, eps=1e-6).float()
    assert torch.equal(runs[0], want.to(dt)), "the residual add is not the rounded sum"


def test_kernel_serves_refuses_what_the_abi_refuses():
    """A negative or NaN eps, norm with glu, a misaligned norm weight, a residual of the wrong
    shape: kernel_serves says no (the plain ops run) instead of the C ABI raising."""
    dt = torch.bfloat16
    x = torch.randn(1, 64, device=DEV, dtype=dt)
    w = torch.randn(32, 64, device=DEV, dtype=dt)
    g = torch.ones(64, device=DEV, dtype=dt)
    assert lin.kernel_serves(x, w, norm_weight=g, eps=1e-6)
    assert not lin.kernel_serves(x, w, norm_weight=g, eps=-1.0)
    assert not lin.kernel_serves(x, w, norm_weight=g, eps=float("nan"))
    assert not lin.kernel_serves(torch.randn(1, 128, device=DEV, dtype=dt), w, norm_weight=g,
                                 glu=True)
    assert not lin.kernel_serves(x, w, norm_weight=torch.ones(65, device=DEV, dtype=dt)[1:])
    assert not lin.kernel_serves(x, w, residual=torch.zeros(1, 31, device=DEV, dtype=dt))
    y = lin.linear(x, w, norm_weight=g, eps=-1.0)       # falls back to the plain ops, no error
    assert y.shape == (1, 32)


def _silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to gu's dtype (what the kernel stages with glu)."""
    g, u = gu.float().chunk(2, dim=-1)
    return (g * torch.sigmoid(g) * u).to(gu.dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n, k", [(1, 8), (37, 24), (2560, 9728), (1000, 2568)])
def test_linear_glu_matches_reference(dtype, m, n, k):
    """y = (silu(gate) * up) w^T. Tolerance: _check's bound for the GEMM of the staged product,
    plus two elements of it a rounding away (the kernel's exp and the reference's sigmoid
    differ in fp32 by a few ulp, which may move a product across a rounding boundary)."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(4000 * m + n + k)
    gu = torch.randn(m, 2 * k, generator=gen) * 2
    gu[:, k + torch.randperm(k, generator=gen)[:max(1, k // 64)]] *= 20    # outlier up channels
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    # gu as a view with a padded row stride, y into a NaN-poisoned buffer
    gbuf = torch.full((m, 2 * k + 8), float("nan"), dtype=dt)
    gbuf[:, :2 * k] = gu.to(dt)
    gbuf, w = gbuf.to(DEV), w.to(dt).to(DEV)
    gv = gbuf[:, :2 * k]
    ybuf = torch.full((m + 1, n + 3), float("nan"), dtype=dt, device=DEV)
    assert lin.kernel_serves(gv, w, max_rows=8, glu=True)
    lin.skinny_linear(gv, w, out=ybuf[:m, :n], glu=True)
    torch.cuda.synchronize()
    x = _silu_mul_ref(gv)
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    # two products a rounding away: at most 2 * u * max|x| * max|w row| each
    flips = 2 * (2 * _U[dt]) * x.double().abs().amax(-1, keepdim=True) \
        * w.double().abs().amax(-1)[None]
    bound = _U[dt] * ref.abs() + 2.0 ** -18 * mag + flips + 1e-30
    err = (ybuf[:m, :n].double() - ref).abs()
    assert torch.isfinite(ybuf[:m, :n]).all(), "unwritten (NaN) or non-finite outputs"
    assert (err / bound).max().item() <= 1.0, f"error {(err / bound).max().item():.2f} x bound"
    assert torch.isnan(ybuf[:, n:]).all() and torch.isnan(ybuf[m]).all()
