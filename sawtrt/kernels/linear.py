"""The linear layers of a step: the skinny-GEMM kernel (saw_linear) for a decode step's single
row, cuBLAS (F.linear) for everything else.

At one row a Linear is a weight stream. On the H200 (`python -m sawtrt.bench.linear`,
docs/perf/linear-h200.json) cuBLAS reaches 33-62 % of the copy bandwidth on Qwen3-4B's layer
shapes (qkv 17.5 us for 31 MB) and saw_linear 37-72 %, 1.13-1.17x faster on qkv, o and gate_up,
even on down and the 778 MB LM head. At two rows it still leads on gate_up (1.08x) but trails on
the others, and cuBLAS wins the per-step sum, so the kernel serves one row and weights up to
128 MB. The kernel also takes what a decoder layer does around its GEMMs at one row — the
RMSNorm before (`norm_weight`), the residual add after (`residual`), the MLP's SiLU-and-multiply
(`linear_glu`) — so a decode step's layer is a chain of these kernels with no elementwise
kernel between them. It is a torch custom op on CUDA, so torch.compile keeps each call as one
opaque node inside the compiled layer work and CUDA graphs capture it.
"""
from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from . import library

# rows served by saw_linear, where bench.linear measured it faster than cuBLAS; the environment
# variable overrides it (0: cuBLAS everywhere, for A/B runs; the kernel takes up to 8)
MAX_ROWS = int(os.environ.get("SAWTRT_LINEAR_MAX_ROWS", "1"))
_KERNEL_MAX_ROWS = 8            # SAW_LINEAR_MAX_M
_MAX_W_BYTES = 128 << 20       # larger weights (LM heads) stream at ~92 % through cuBLAS too
_MAX_X_BYTES = 160 * 1024      # SAW_LINEAR_MAX_X_BYTES: x is staged in shared memory


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back (the Llama/Qwen3 convention): what the model runs
    and what saw_linear_fused applies to x with norm_weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def _plain(x, w, bias=None, norm_weight=None, eps: float = 0.0, residual=None,
           glu: bool = False) -> torch.Tensor:
    """What the kernel computes, in torch ops (cuBLAS for the product)."""
    if glu:
        x = _silu_mul(x)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    y = F.linear(x, w, bias)
    return y if residual is None else residual + y


def _row_stride(t: torch.Tensor) -> int:
    """t's row stride as saw_linear takes it (a single row's stride is arbitrary in torch)."""
    return t.shape[1] if t.shape[0] == 1 else t.stride(0)


def kernel_serves(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  max_rows: int = MAX_ROWS, max_weight_bytes: int = _MAX_W_BYTES, *,
                  norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  residual: torch.Tensor | None = None, glu: bool = False) -> bool:
    """Whether saw_linear_fused takes these arguments (else the plain ops): everything the C ABI
    requires, checked here so that what it would refuse falls back instead. glu: x is
    [gate | up], 2k wide."""
    if not (x.is_cuda and x.dim() == 2 and w.dim() == 2 and x.dtype == w.dtype
            and w.device == x.device):
        return False
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if not (1 <= m <= min(max_rows, _KERNEL_MAX_ROWS) and x.shape[1] == (2 * k if glu else k)
            and k % 8 == 0 and not (glu and norm_weight is not None)
            and (norm_weight is None or eps >= 0.0)):      # False for a NaN eps too
        return False

    def vector_ok(v: torch.Tensor | None, size: int, aligned: bool = False) -> bool:
        return v is None or (v.device == x.device and v.dtype == x.dtype
                             and tuple(v.shape) == (size,) and v.is_contiguous()
                             and (not aligned or v.data_ptr() % 16 == 0))

    if not (vector_ok(bias, n) and vector_ok(norm_weight, k, aligned=True)):
        return False
    if residual is not None and not (
            residual.device == x.device and residual.dtype == x.dtype
            and tuple(residual.shape) == (m, n) and residual.stride(1) == 1
            and _row_stride(residual) >= n):
        return False
    lib = library.try_load()
    return (lib is not None and hasattr(lib, "saw_linear_fused")
            and library.act_dtype_code(x.dtype) is not None
            and m * k * x.element_size() <= _MAX_X_BYTES
            and w.numel() * w.element_size() <= max_weight_bytes
            and x.stride(1) == 1 and _row_stride(x) % 8 == 0 and _row_stride(x) >= x.shape[1]
            and w.is_contiguous()
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
                  eps: float = 0.0, residual: torch.Tensor | None = None,
                  glu: bool = False) -> torch.Tensor:
    """_plain(x, w, bias, norm_weight, eps, residual, glu) through saw_linear_fused (the caller
    checked kernel_serves with the same arguments; the kernel rounds silu(gate) * up once)."""
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    fusion = None
    if norm_weight is not None or residual is not None:
        fusion = library.SawLinearFusion(
            norm_weight=None if norm_weight is None else norm_weight.data_ptr(),
            norm_eps=eps, residual=None if residual is None else residual.data_ptr(),
            residual_stride=0 if residual is None else _row_stride(residual))
    lib = library.load()
    library.check(lib.saw_linear_fused(
        library.act_dtype_code(x.dtype), x.data_ptr(), _row_stride(x), w.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), _row_stride(out), m, n, k,
        int(glu), None if fusion is None else ctypes.byref(fusion),
        torch.cuda.current_stream(x.device).cuda_stream), lib)
    return out


def _dispatch(x, w, bias, norm_weight, eps, residual, glu) -> torch.Tensor:
    kw = dict(norm_weight=norm_weight, eps=eps, residual=residual, glu=glu)
    if kernel_serves(x, w, bias, **kw):
        return skinny_linear(x, w, bias, **kw)
    return _plain(x, w, bias, norm_weight, eps, residual, glu)


def _register() -> bool:
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:   # torch < 2.4: cuBLAS everywhere
        return False

    @custom_op("sawtrt::linear", mutates_args=())
    def _linear_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   norm_weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None,
                   glu: bool) -> torch.Tensor:
        return _dispatch(x, w, bias, norm_weight, eps, residual, glu)

    @_linear_op.register_fake
    def _(x, w, bias, norm_weight, eps, residual, glu):
        return x.new_empty(x.shape[0], w.shape[0])

    return True


CUSTOM_OP_REGISTERED = _register()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + F.linear(rms_norm(x, norm_weight, eps), w, bias) for 2-D x, the norm and the
    residual optional. CUDA inputs of at most MAX_ROWS rows go through the sawtrt::linear op
    (saw_linear_fused where kernel_serves, else the plain ops inside it); the row test runs at
    trace time under torch.compile, so larger steps keep inductor's fused elementwise work and
    plain mm and pay no op dispatch."""
    if CUSTOM_OP_REGISTERED and x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS:
        return torch.ops.sawtrt.linear(x, w, bias, norm_weight, eps, residual, False)
    return _plain(x, w, bias, norm_weight, eps, residual)


def linear_glu(gu: torch.Tensor, w: torch.Tensor, *,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """The gated MLP's down projection residual + F.linear(silu(gate) * up, w) of gu = [gate |
    up] (2-D), the residual optional. One row on CUDA goes through the sawtrt::linear op: the
    kernel computes the product while staging it (no SiLU kernel between the two GEMMs);
    elsewhere, and at trace time for larger steps, the plain ops that inductor fuses."""
    if CUSTOM_OP_REGISTERED and gu.is_cuda and gu.dim() == 2 and gu.shape[0] <= MAX_ROWS:
        return torch.ops.sawtrt.linear(gu, w, None, None, 0.0, residual, True)
    return _plain(gu, w, residual=residual, glu=True)
