"""The linear layers of a step: the skinny-GEMM kernel (saw_linear) for a decode step's single
row, cuBLAS (F.linear) for everything else.

At one row a Linear is a weight stream. On the H200 (`python -m sawtrt.bench.linear`,
docs/perf/linear-h200.json) cuBLAS reaches 33-62 % of the copy bandwidth on Qwen3-4B's layer
shapes (qkv 17.5 us for 31 MB) and saw_linear 37-72 %, 1.13-1.17x faster on qkv, o and gate_up,
even on down and the 778 MB LM head. At two rows it still leads on gate_up (1.08x) but trails on
the others, and cuBLAS wins the per-step sum, so the kernel serves one row and weights up to
128 MB; `linear_glu` does the same for the MLP's down projection with the SiLU-and-multiply
folded into the kernel. Both are torch custom ops on CUDA, so
torch.compile keeps each as one opaque call inside the compiled layer work and CUDA graphs
capture it.
"""
from __future__ import annotations

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


def kernel_serves(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  max_rows: int = MAX_ROWS, max_weight_bytes: int = _MAX_W_BYTES) -> bool:
    """Whether saw_linear takes y = x w^T + bias for these tensors (else cuBLAS): everything
    the C ABI requires, checked here so that a tensor it would refuse falls back instead."""
    if not (x.is_cuda and x.dim() == 2 and w.dim() == 2 and x.dtype == w.dtype
            and w.device == x.device):
        return False
    m, k = x.shape
    if not (1 <= m <= min(max_rows, _KERNEL_MAX_ROWS) and w.shape[1] == k and k % 8 == 0):
        return False
    if bias is not None and not (bias.device == x.device and bias.dtype == x.dtype
                                 and bias.shape == (w.shape[0],) and bias.is_contiguous()):
        return False
    lib = library.try_load()
    return (lib is not None and hasattr(lib, "saw_linear")
            and library.act_dtype_code(x.dtype) is not None
            and m * k * x.element_size() <= _MAX_X_BYTES
            and w.numel() * w.element_size() <= max_weight_bytes
            and x.stride(1) == 1 and _row_stride(x) % 8 == 0 and _row_stride(x) >= k
            and w.is_contiguous()
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def _row_stride(t: torch.Tensor) -> int:
    """t's row stride as saw_linear takes it (a single row's stride is arbitrary in torch)."""
    return t.shape[1] if t.shape[0] == 1 else t.stride(0)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x w^T + bias through saw_linear (the caller checked kernel_serves)."""
    m, n = x.shape[0], w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    lib = library.load()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    library.check(lib.saw_linear(
        library.act_dtype_code(x.dtype), x.data_ptr(), _row_stride(x), w.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), _row_stride(out), m, n,
        x.shape[1], stream), lib)
    return out


def _dispatch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if kernel_serves(x, w, bias):
        return skinny_linear(x, w, bias)
    return F.linear(x, w, bias)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def glu_kernel_serves(gu: torch.Tensor, w: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether saw_linear_glu takes y = (silu(gate) * up) w^T for gu = [gate | up]."""
    k = w.shape[1]
    lib = library.try_load()
    return (gu.dim() == 2 and gu.shape[1] == 2 * k and lib is not None
            and hasattr(lib, "saw_linear_glu") and kernel_serves(gu[:, :k], w, None, max_rows))


def skinny_linear_glu(gu: torch.Tensor, w: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """(silu(gate) * up) w^T through saw_linear_glu (the caller checked glu_kernel_serves)."""
    m, n, k = gu.shape[0], w.shape[0], w.shape[1]
    if out is None:
        out = torch.empty(m, n, dtype=gu.dtype, device=gu.device)
    lib = library.load()
    library.check(lib.saw_linear_glu(
        library.act_dtype_code(gu.dtype), gu.data_ptr(), _row_stride(gu), w.data_ptr(),
        out.data_ptr(), _row_stride(out), m, n, k,
        torch.cuda.current_stream(gu.device).cuda_stream), lib)
    return out


def _dispatch_glu(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if glu_kernel_serves(gu, w):
        return skinny_linear_glu(gu, w)
    return F.linear(_silu_mul(gu), w)


def _register() -> bool:
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:   # torch < 2.4: cuBLAS everywhere
        return False

    @custom_op("sawtrt::linear", mutates_args=())
    def _linear_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _dispatch(x, w, bias)

    @_linear_op.register_fake
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @custom_op("sawtrt::linear_glu", mutates_args=())
    def _linear_glu_op(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _dispatch_glu(gu, w)

    @_linear_glu_op.register_fake
    def _(gu, w):
        return gu.new_empty(gu.shape[0], w.shape[0])

    return True


CUSTOM_OP_REGISTERED = _register()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for 2-D x. CUDA inputs of at most MAX_ROWS rows go through the sawtrt::linear op
    (saw_linear where kernel_serves, else cuBLAS inside it); the row test runs at trace time
    under torch.compile, so larger steps keep inductor's plain mm and pay no op dispatch."""
    if CUSTOM_OP_REGISTERED and x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS:
        return torch.ops.sawtrt.linear(x, w, bias)
    return F.linear(x, w, bias)


def linear_glu(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gated MLP's down projection F.linear(silu(gate) * up, w) of gu = [gate | up] (2-D).
    One row on CUDA goes through the sawtrt::linear_glu op: saw_linear_glu computes the product
    while staging it for the GEMM (no SiLU kernel between the two GEMMs); elsewhere, and at
    trace time for larger steps, the plain ops that inductor fuses."""
    if CUSTOM_OP_REGISTERED and gu.is_cuda and gu.dim() == 2 and gu.shape[0] <= MAX_ROWS:
        return torch.ops.sawtrt.linear_glu(gu, w)
    return F.linear(_silu_mul(gu), w)
