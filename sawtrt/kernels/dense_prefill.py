"""Prefill at dense-attention speed: a step's new tokens attend to their own fresh K/V.

Semantics ("fresh", the runtime's default; reference: sawtrt.reference.fresh_prefill_attention):
a sequence with >= 2 new tokens attends causally to its cached prefix, read from the pages and
dequantized, and to the step's own K/V as computed (not quantized); a sequence with one new
token (a decode row) reads everything from the cache through the INT4 decode kernel. The step
still writes every new token's K/V into its pages (rotate + quantize, as the spec says), so later
chunks and decode steps read earlier chunks from INT4 pages. The quantized-read semantics
(`ops.attention_step` without a plan) stays available for teacher-forced perplexity and the
TensorRT plugin.

How (GPU): the cached prefixes are dequantized and un-rotated into a bf16 scratch
(saw_gather_kv, memory-bound: ~D/2 + 4 bytes read and 2 D written per K or V vector), then
tensor-core attention with the causal mask aligned bottom-right. Dense sequences of one length
go to cuDNN on 4-D views: without a prefix one causal SDPA call (the dense yardstick itself),
with one two calls (prefix non-causal, new tokens causal, each with its log-sum-exp) merged by
LSE; ragged batches go to flash-attention's variable-length entry point
(`aten._flash_attention_forward` with cu_seqlens: GQA, bottom-right causal) over [prefix; new]
per sequence. Un-rotating the prefix instead of rotating q keeps the query exact (no rounding of
a rotated query) and needs no inverse rotation of the output.

Order (fused_step): the page write on a side stream, the dense rows beside it (they read only
positions before each prefix's end, which the write never touches), then, after the join, the
decode rows, which read their own new token from the pages.

A step is described once by a PrefillPlan (host-built, then moved to the device), read by every
layer; the GPU path never reads device data (no sync).

Shapes: T tokens in the step, B sequences, P of them dense (q_len >= 2), Hq / Hkv heads, D.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .. import kv_cache, reference
from ..spec import PageLayout
from . import capi, library, ops

SEMANTICS = ("fresh", "cache")   # new tokens see their fresh K/V / read everything from the cache
BACKENDS = ("auto", "flash", "cudnn", "cudnn-split", "cudnn-bucket", "cudnn-seq")
# cuDNN builds an execution plan for every new shape (~45-65 ms on the H200, ~900 ms for the
# process's first; torch keeps them per thread), and a serving step's chunk lengths change from
# step to step. So a prompt's fresh run of CUDNN_MIN_FRESH or more tokens (no cached prefix)
# is zero-padded to a multiple of CUDNN_BUCKET rows, exact under the causal mask (a real row
# never sees a later key): the plans `warm_up` builds serve every length, and the rest of a
# ragged step goes to flash varlen. cuDNN's causal prefill is 1.9x flash varlen's speed on
# 1 x 8192 (`sawtrt.bench.prefill`). Exact shapes still go to cuDNN for uniform steps (several
# sequences of one length and prefix, or one chunk over a prefix: a plan per new shape, which
# chunking a long prompt meets); "cudnn-seq" (one call per sequence at its exact length) only
# when asked for.
CUDNN_BUCKET = 256
CUDNN_MIN_FRESH = 1024


@dataclass
class PrefillPlan:
    """One step's split into dense (q_len >= 2) and decode (q_len == 1) sequences.

    slots        [T] int32    cache slot of every new token (-1: skip)
    dense_seqs   [P] int64    the dense sequences (None: all B are dense)
    dense_rows   [Tp] int64   their token rows in the step (None: all T rows)
    decode_seqs  [B-P] int64  the decode sequences (None: there are none)
    decode_rows  [B-P] int64  their token rows
    cu_q         [P+1] int32  prefix sums of the dense q_lens
    cu_k         [P+1] int32  prefix sums of prefix + q_len: rows of [prefix; new] per sequence
    prefix_lens  [P] int32    cached tokens before the step's first new token
    cu_prefix    [P+1] int32  prefix sums of prefix_lens (the split backend's prefix rows)
    new_rows     [Tp] int64   row of each new token in the [prefix; new] buffer
    max_q, max_k, max_prefix, total_k: host-side sizes; max_decode: longest decode sequence
                 (the decode kernel's split-KV plan is sized by it)
    shape        (P, q_len, prefix) when every dense sequence has the same q_len and prefix
                 (4-D dense calls), else None
    q_lens, seq_lens: host lists (the CPU reference)
    total_prefix host-side: cached prefix rows of all dense sequences
    fresh_runs   ((row, q_len), ...) dense sequences without a prefix and >= CUDNN_MIN_FRESH
                 new tokens, by their first row among the dense rows ("cudnn-bucket")
    rest         the plan of the other dense sequences (None: there are none), its rows
                 `rest_rows` [Tr] int64 among the dense rows, its sequences `rest_seqs` [Pr]
                 int64 among the dense sequences
    """

    slots: torch.Tensor
    dense_seqs: torch.Tensor | None
    dense_rows: torch.Tensor | None
    decode_seqs: torch.Tensor | None
    decode_rows: torch.Tensor | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    prefix_lens: torch.Tensor
    cu_prefix: torch.Tensor
    new_rows: torch.Tensor
    max_q: int
    max_k: int
    max_prefix: int
    total_k: int
    max_decode: int
    shape: tuple[int, int, int] | None
    q_lens: list[int]
    seq_lens: list[int]
    total_prefix: int = 0
    fresh_runs: tuple[tuple[int, int], ...] = ()
    rest: "PrefillPlan | None" = None
    rest_rows: torch.Tensor | None = None
    rest_seqs: torch.Tensor | None = None

    @classmethod
    def build(cls, q_lens, seq_lens, slot_mapping, device=None,
              split_fresh: bool = True) -> "PrefillPlan | None":
        """From host-side q_lens / seq_lens [B] and slot_mapping [T]; None when no sequence has
        two or more new tokens (a decode step: nothing to do densely). split_fresh: find the
        fresh runs (and the plan of the rest)."""
        ql = np.asarray([int(n) for n in q_lens], dtype=np.int64)
        sl = np.asarray([int(n) for n in seq_lens], dtype=np.int64)
        dense = np.nonzero(ql >= 2)[0]
        if dense.size == 0:
            return None
        bad = dense[ql[dense] > sl[dense]]
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"sequence {b}: {ql[b]} new tokens but only {sl[b]} in the cache")
        decode = np.nonzero(ql == 1)[0]          # q_len 0: a sequence with nothing new
        starts = np.concatenate(([0], np.cumsum(ql)))
        dq = ql[dense]
        dp = sl[dense] - dq

        def cum(x):
            return np.concatenate(([0], np.cumsum(x)))

        cu_q, cu_k, cu_p = cum(dq), cum(dp + dq), cum(dp)
        tp = int(cu_q[-1])
        # dense token j of dense sequence i: row j - cu_q[i] + starts[dense[i]] of the step,
        # row j - cu_q[i] + cu_k[i] + dp[i] of the [prefix; new] buffer
        new_rows = np.arange(tp) + np.repeat(cu_k[:-1] + dp - cu_q[:-1], dq)
        dense_rows = np.arange(tp) + np.repeat(starts[dense] - cu_q[:-1], dq)

        def t(x, dtype=torch.int64):
            return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)

        every = dense.size == ql.size
        uniform = np.all(dq == dq[0]) and np.all(dp == dp[0])
        fresh = np.nonzero((dp == 0) & (dq >= CUDNN_MIN_FRESH))[0] if split_fresh else \
            np.zeros(0, dtype=np.int64)
        others = np.setdiff1d(np.arange(dense.size), fresh)
        rest = rest_rows = rest_seqs = None
        if fresh.size and others.size:
            rest = cls.build(dq[others], dq[others] + dp[others], torch.zeros(0),
                             split_fresh=False)
            rest_rows = t(np.concatenate([np.arange(cu_q[i], cu_q[i + 1]) for i in others]))
            rest_seqs = t(others)
        slots = slot_mapping if isinstance(slot_mapping, torch.Tensor) else \
            torch.as_tensor(slot_mapping)
        plan = cls(
            slots=slots.to(torch.int32),
            dense_seqs=None if every else t(dense), dense_rows=None if every else t(dense_rows),
            decode_seqs=t(decode) if decode.size else None,
            decode_rows=t(starts[decode]) if decode.size else None,
            cu_q=t(cu_q, torch.int32), cu_k=t(cu_k, torch.int32),
            prefix_lens=t(dp, torch.int32), cu_prefix=t(cu_p, torch.int32),
            new_rows=t(new_rows), max_q=int(dq.max()), max_k=int((dp + dq).max()),
            max_prefix=int(dp.max()), total_k=int(cu_k[-1]),
            max_decode=int(sl[decode].max()) if decode.size else 0,
            shape=(int(dense.size), int(dq[0]), int(dp[0])) if uniform else None,
            q_lens=ql.tolist(), seq_lens=sl.tolist(), total_prefix=int(cu_p[-1]),
            fresh_runs=tuple((int(cu_q[i]), int(dq[i])) for i in fresh),
            rest=rest, rest_rows=rest_rows, rest_seqs=rest_seqs)
        return plan if device is None else plan.to(device)

    def dense_lens(self) -> list[tuple[int, int]]:
        """(q_len, prefix) of every dense sequence, in order (host-side)."""
        return [(q, s - q) for q, s in zip(self.q_lens, self.seq_lens) if q >= 2]

    @classmethod
    def from_meta(cls, meta, device=None) -> "PrefillPlan | None":
        """From a step's AttentionMetadata. Host tensors are read directly; device ones are
        copied to the host first (one sync: give the host copies where the step has them)."""
        return cls.build(meta.q_lens.tolist(), meta.seq_lens.tolist(),
                         meta.slot_mapping.cpu(), device)

    def to(self, device) -> "PrefillPlan":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.rest is not None:
            moved["rest"] = self.rest.to(device)
        return replace(self, **moved)


# -- dense attention backends -------------------------------------------------------------------
_refused: set[tuple] = set()   # (backend, D, dtype) that raised once in this process


def _sdpa_cudnn_4d(q4, k4, v4, causal: bool, scale: float):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=scale,
                                              enable_gqa=True)


def _cudnn_lse(q4, k4, v4, causal: bool, scale: float):
    """(out [B, H, L, D], lse [B, H, L] natural log) from cuDNN."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, causal,
                                                             False, scale=scale)
    return res[0], res[1].reshape(res[0].shape[:-1])   # lse [B, H, L] (some versions: [..., 1])


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """Causal (bottom-right aligned) variable-length attention: q [Tq, Hq, D], k/v [Tk, Hkv, D],
    sequences back to back by cu_q / cu_k; returns [Tq, Hq, D]."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True,
                                                   False, scale=scale)[0]


def _merge(o1, lse1, o2, lse2):
    """Two partial attentions over disjoint key sets -> one, by log-sum-exp (o [B, H, L, D],
    lse [B, H, L] natural log)."""
    m = torch.maximum(lse1, lse2)
    w1 = torch.exp(lse1 - m).unsqueeze(-1)
    w2 = torch.exp(lse2 - m).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2) / (w1 + w2)


def choose_backend(plan: PrefillPlan, backend: str = "auto", key: tuple = ()) -> str:
    """Which dense call serves this plan. auto: cuDNN at the exact shape for batches of several
    sequences of one q_len and prefix, or one chunk over a prefix (one causal call without a
    prefix, the LSE split with one: fixed-shape callers); cuDNN on padded rows for the fresh
    runs of a step (flash varlen for the rest of it); flash varlen otherwise.
    `key` (D, dtype) skips a cuDNN form that raised before."""
    if backend not in BACKENDS:
        raise ValueError(f"dense prefill backend {backend!r}: one of {', '.join(BACKENDS)}")
    if backend == "auto":   # H200, qwen3-4b shape: cuDNN 1.9x faster than flash varlen on
        # fresh prompts; on a 2048-token chunk over 8192 cached, cuDNN split (prefix +
        # causal new, merged by LSE) 0.74 ms vs flash varlen 1.03 ms (sawtrt.bench.prefill)
        if plan.shape is not None and (plan.shape[0] > 1 or plan.shape[2] > 0):
            backend = "cudnn"
        else:
            backend = "cudnn-bucket" if plan.fresh_runs else "flash"
    if backend == "cudnn-bucket" and not plan.fresh_runs:
        backend = "flash"
    if backend in ("cudnn-seq", "cudnn-bucket"):
        return "flash" if (backend, *key) in _refused else backend
    if backend in ("cudnn", "cudnn-split") and plan.shape is None:
        backend = "flash"                  # cuDNN calls here take 4-D (uniform) batches only
    if backend == "cudnn-split" and plan.shape[2] == 0:
        backend = "cudnn"
    if backend == "cudnn" and plan.shape[2] > 0:
        backend = "cudnn-split"            # one causal cuDNN call cannot align bottom-right
    return "flash" if (backend, *key) in _refused else backend


def _cudnn_causal(q4, k4, v4, scale: float, kp4=None, vp4=None):
    """Causal attention of q4 over its own k4 / v4 [B, H, L, D] by cuDNN, after a cached prefix
    kp4 / vp4 (a non-causal call, merged by log-sum-exp) when one is given; q4's dtype."""
    if kp4 is None:
        return _sdpa_cudnn_4d(q4, k4, v4, True, scale)
    o1, l1 = _cudnn_lse(q4, kp4, vp4, False, scale)
    o2, l2 = _cudnn_lse(q4, k4, v4, True, scale)
    return _merge(o1, l1, o2, l2).to(q4.dtype)


def bucketed_causal(q, k, v, scale: float, attend=None, bucket: int | None = None):
    """Causal attention of one fresh run, q [L, Hq, D] over its own k / v [L, Hkv, D], as one
    call on rows zero-padded to a multiple of `bucket` (exact: row i sees keys 0..i only);
    returns [L, Hq, D]. attend(q4, k4, v4, causal, scale) on [1, H, Lb, D] views: cuDNN by
    default (a plan per padded length, and one per length for runs that need no padding: those
    go in as views of the caller's rows, without the copies)."""
    attend = attend or _sdpa_cudnn_4d
    bucket = bucket or CUDNN_BUCKET
    n = q.shape[0]
    nb = -(-n // bucket) * bucket
    if n == 0:
        return q.new_empty(q.shape)
    if nb == n:
        return attend(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                      True, scale)[0].transpose(0, 1)

    def padded(x):            # [1, H, Lb, D] view of a packed [1, Lb, H, D] buffer
        buf = x.new_empty(1, nb, *x.shape[1:])
        buf[0, :n] = x
        buf[0, n:] = 0
        return buf.transpose(1, 2)

    return attend(padded(q), padded(k), padded(v), True, scale)[0].transpose(0, 1)[:n]


def warm_up(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, device,
            max_tokens: int, scale: float = 1.0) -> int:
    """Build cuDNN's plans, on the calling thread (torch keeps them per thread), for every
    length a fresh run of up to max_tokens can take (CUDNN_MIN_FRESH .. max_tokens rounded up
    to CUDNN_BUCKET): per bucket, the padded call and the unpadded one on rows of a step's qkv
    [T, (Hq + 2 Hkv) D], so a step on this thread never waits on one. Returns the number of
    calls made; 0 when max_tokens < CUDNN_MIN_FRESH or cuDNN refuses the shape (with a warning:
    flash varlen serves those runs)."""
    lengths = range(-(-CUDNN_MIN_FRESH // CUDNN_BUCKET) * CUDNN_BUCKET,
                    -(-max_tokens // CUDNN_BUCKET) * CUDNN_BUCKET + 1, CUDNN_BUCKET)
    if max_tokens < CUDNN_MIN_FRESH:
        return 0
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    qkv = torch.zeros(lengths[-1], (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = qkv[:, :hq * d].unflatten(1, (hq, d))
    k = qkv[:, hq * d:(hq + hkv) * d].unflatten(1, (hkv, d))
    v = qkv[:, (hq + hkv) * d:].unflatten(1, (hkv, d))
    calls = 0
    try:
        for n in lengths:
            for m in (n - 1, n):          # padded to n, and n itself (no run is shorter than MIN)
                if m >= CUDNN_MIN_FRESH:
                    bucketed_causal(q[:m], k[:m], v[:m], scale)
                    calls += 1
    except RuntimeError as e:
        _refused.add(("cudnn-bucket", head_dim, dtype))
        warnings.warn(f"cuDNN refused the padded prefill ({type(e).__name__}: {str(e)[:200]}); "
                      "flash varlen serves every prompt", RuntimeWarning, stacklevel=2)
        return 0
    return calls


def _cudnn_per_sequence(q, kn, vn, prefix_kv, plan: PrefillPlan, scale: float):
    """Dense rows of a ragged step, one cuDNN call per sequence: causal over its new tokens,
    plus (with a cached prefix) a non-causal call over the prefix merged by log-sum-exp."""
    kp, vp = prefix_kv("prefix", plan) if plan.max_prefix else (None, None)
    o = torch.empty_like(q)
    a = p = 0

    def bhld(x, rows):          # [rows, H, D] -> [1, H, rows, D] view
        return x[rows].unsqueeze(0).transpose(1, 2)

    for lq, lp in plan.dense_lens():
        new = slice(a, a + lq)
        pre = slice(p, p + lp)
        oi = _cudnn_causal(bhld(q, new), bhld(kn, new), bhld(vn, new), scale,
                           *((bhld(kp, pre), bhld(vp, pre)) if lp else ()))
        o[new] = oi[0].transpose(0, 1)
        a, p = a + lq, p + lp
    return o


def _dense(q, kn, vn, prefix_kv, plan: PrefillPlan, scale: float, backend: str):
    """Attention of the dense rows: q [Tp, Hq, D], their fresh kn/vn [Tp, Hkv, D]; prefix_kv is
    a callable (rows, plan, seqs=None) giving the dequantized prefixes (k, v) [rows, Hkv, D] of
    `plan`'s sequences (`seqs`: their indices among this step's dense sequences when `plan` is
    a part of it) at rows "cat" (the [prefix; new] buffer by cu_k) or "prefix" (prefix rows
    only, by cu_prefix)."""
    hq, hkv, d = q.shape[1], kn.shape[1], q.shape[2]
    name = choose_backend(plan, backend, (d, q.dtype))
    if name == "cudnn-seq":         # only when asked for: auto never picks it
        return _cudnn_per_sequence(q, kn, vn, prefix_kv, plan, scale)
    if name == "cudnn-bucket":
        try:
            if plan.rest is None and plan.fresh_runs == ((0, q.shape[0]),):
                return bucketed_causal(q, kn, vn, scale)       # one run, every dense row
            o = torch.empty_like(q)
            for r0, n in plan.fresh_runs:
                rows = slice(r0, r0 + n)
                o[rows] = bucketed_causal(q[rows], kn[rows], vn[rows], scale)
        except RuntimeError:
            if backend != "auto":
                raise
            _refused.add((name, d, q.dtype))
        else:
            if plan.rest is not None:
                rr = plan.rest_rows
                o.index_copy_(0, rr, _dense(
                    q.index_select(0, rr), kn.index_select(0, rr), vn.index_select(0, rr),
                    lambda rows, p, seqs=None: prefix_kv(rows, p, plan.rest_seqs), plan.rest,
                    scale, "flash"))
            return o
    elif name != "flash":
        try:
            b, lq, lp = plan.shape
            q4 = q.view(b, lq, hq, d).transpose(1, 2)
            k4 = kn.view(b, lq, hkv, d).transpose(1, 2)
            v4 = vn.view(b, lq, hkv, d).transpose(1, 2)
            prefix = ()
            if name == "cudnn-split":
                kp, vp = prefix_kv("prefix", plan)
                prefix = (kp.view(b, lp, hkv, d).transpose(1, 2),
                          vp.view(b, lp, hkv, d).transpose(1, 2))
            o = _cudnn_causal(q4, k4, v4, scale, *prefix)
            return o.transpose(1, 2).reshape(b * lq, hq, d)
        except RuntimeError:
            if backend != "auto":
                raise
            _refused.add((name, d, q.dtype))
    if plan.max_prefix == 0:
        k, v = kn, vn
    else:
        k, v = prefix_kv("cat", plan)
        k.index_copy_(0, plan.new_rows, kn)
        v.index_copy_(0, plan.new_rows, vn)
    return flash_varlen(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale)


# -- the step -----------------------------------------------------------------------------------
# The page write runs on a side stream beside the prefix gather and the dense attention (what it
# writes, positions >= each dense sequence's prefix, is never read by them); the decode rows,
# which read it, run after the join. False: the write on the current stream first (the order
# of the first published numbers; `sawtrt.bench.prefill --backends auto,serial-write` times both).
OVERLAP_WRITE = True
_side_streams: dict[tuple, tuple] = {}


def _side_stream(dev) -> tuple:
    """(stream, fork event, join event) of the device and calling thread: the events are made
    once and recorded again every step (a wait takes the record current when it is enqueued),
    so a fork and a join cost two event records, not two event creations."""
    key = (dev.index if dev.index is not None else torch.cuda.current_device(),
           threading.get_ident())
    s = _side_streams.get(key)
    if s is None:
        s = _side_streams[key] = (torch.cuda.Stream(device=dev),
                                  torch.cuda.Event(enable_timing=False),
                                  torch.cuda.Event(enable_timing=False))
    return s


def gather_prefix(pool_layer, layout: PageLayout, cfg, block_tables, prefix_lens, row_starts,
                  total_rows: int, max_prefix: int, dtype):
    """Dequantized, un-rotated cached prefixes (k, v) [total_rows, Hkv, D] in `dtype`: sequence
    b's positions 0 .. prefix_lens[b]-1 at rows row_starts[b] + p (other rows: left unset)."""
    hkv, d = layout.num_kv_heads, layout.head_dim
    dev = block_tables.device
    k = torch.empty(total_rows, hkv, d, dtype=dtype, device=dev)
    v = torch.empty(total_rows, hkv, d, dtype=dtype, device=dev)
    lib = library.load()
    library.check(lib.saw_gather_kv(
        ctypes.byref(cfg), pool_layer.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        prefix_lens.data_ptr(), row_starts.data_ptr(), prefix_lens.shape[0], max_prefix,
        k.data_ptr(), v.data_ptr(), hkv * d, ops._stream(dev)), lib)
    return k, v


def gpu_serves(layout: PageLayout, num_q_heads: int, dtype, device) -> bool:
    """Whether attention_step runs on the GPU path for this layer (else the CPU reference)."""
    cfg = ops.fused_step_config(layout, num_q_heads, dtype, device)
    return cfg is not None and hasattr(library.load(), "saw_gather_kv") \
        and hasattr(torch.ops.aten, "_flash_attention_forward")


class StepKernels:
    """The compiled calls of one fused step and the streams they run on: the page write
    (saw_write_kv, on the side stream when OVERLAP_WRITE), the decode rows (saw_decode), the
    prefix gather (saw_gather_kv). `fused_step` orders them; tests give it PyTorch stand-ins
    with the same methods to check that order and the row bookkeeping on the CPU."""

    def __init__(self, layout: PageLayout, num_q_heads: int, dtype, device, sm_scale: float):
        self.layout, self.hq = layout, num_q_heads
        self.cfg = ops.kernel_config(layout, num_q_heads, dtype, device, sm_scale)
        self.lib = library.load()
        self.main = torch.cuda.current_stream(device)
        self.side, self._fork, self._join = _side_stream(device) if OVERLAP_WRITE else \
            (self.main, None, None)

    def write(self, qkv, slots, pool_layer) -> None:
        """Rotate + quantize + store every new token's K/V (slots [T] int32, -1 skips)."""
        if self.side is not self.main:                # after qkv and the pool's last readers
            self._fork.record(self.main)
            self.side.wait_event(self._fork)
        library.check(self.lib.saw_write_kv(ctypes.byref(self.cfg), qkv.data_ptr(),
                                            qkv.stride(0), slots.data_ptr(), qkv.shape[0],
                                            pool_layer.data_ptr(), self.side.cuda_stream),
                      self.lib)

    def join(self) -> None:
        """Everything after this on the current stream sees the pages the write wrote."""
        if self.side is not self.main:
            self._join.record(self.side)
            self.main.wait_event(self._join)

    def decode(self, q, pool_layer, tables, lens, max_len: int):
        """The INT4 decode kernel for one query row per sequence: q [n, >= Hq*D] (row stride
        q.stride(0)), tables [n, max_pages], lens [n] int32; returns [n, Hq*D]."""
        n, d = q.shape[0], self.layout.head_dim
        od = torch.empty(n, self.hq * d, dtype=q.dtype, device=q.device)
        ws_bytes = capi.workspace_bytes(self.cfg, n, n, max_len)
        ws = ops._workspace(q.device, ws_bytes)
        library.check(self.lib.saw_decode(ctypes.byref(self.cfg), q.data_ptr(), q.stride(0),
                                          pool_layer.data_ptr(), tables.data_ptr(),
                                          tables.shape[1], lens.data_ptr(), n, max_len,
                                          od.data_ptr(), ws.data_ptr(), ws.numel(),
                                          ops._stream(q.device)), self.lib)
        return od

    def gather(self, pool_layer, tables, prefix_lens, row_starts, total_rows: int,
               max_prefix: int, dtype):
        return gather_prefix(pool_layer, self.layout, self.cfg, tables, prefix_lens, row_starts,
                             total_rows, max_prefix, dtype)


def fused_step(kern, qkv, pool_layer, layout: PageLayout, num_q_heads: int, block_tables,
               seq_lens, plan: PrefillPlan, sm_scale: float, out=None, backend: str = "auto"):
    """The GPU step's order over `kern` (a StepKernels): write the pages (side stream), the
    dense rows (prefix gather + fresh K/V, one tensor-core attention call), then, after the
    join, the decode rows over the pages. Returns out [T, Hq*D]."""
    d, hkv, hq = layout.head_dim, layout.num_kv_heads, num_q_heads
    t, dev = qkv.shape[0], qkv.device
    tables = ops._i32(block_tables, dev)
    # 1. the cache holds exactly what the spec says: every new token's K/V, rotated + quantized
    kern.write(qkv, plan.slots, pool_layer)
    try:
        # 2. dense rows: fresh K/V + dequantized prefix (positions < prefix: never what 1 writes)
        if out is None and plan.dense_rows is not None:     # decode rows or q_len-0 rows too
            out = torch.empty(t, hq * d, dtype=qkv.dtype, device=dev)
        x = qkv if plan.dense_rows is None else qkv.index_select(0, plan.dense_rows)
        q = x[:, :hq * d].unflatten(1, (hq, d))
        kn = x[:, hq * d:(hq + hkv) * d].unflatten(1, (hkv, d))
        vn = x[:, (hq + hkv) * d:(hq + 2 * hkv) * d].unflatten(1, (hkv, d))
        tables_p = tables if plan.dense_seqs is None else tables.index_select(0, plan.dense_seqs)

        def prefix_kv(rows: str, p: PrefillPlan, seqs=None):
            tab = tables_p if seqs is None else tables_p.index_select(0, seqs)
            if rows == "cat":
                return kern.gather(pool_layer, tab, p.prefix_lens, p.cu_k[:-1], p.total_k,
                                   p.max_prefix, qkv.dtype)
            return kern.gather(pool_layer, tab, p.prefix_lens, p.cu_prefix[:-1], p.total_prefix,
                               p.max_prefix, qkv.dtype)

        o = _dense(q, kn, vn, prefix_kv, plan, sm_scale, backend).reshape(-1, hq * d)
    finally:
        # the decode rows below, the next layer and the next step read the pages; and qkv /
        # slots go back to the allocator only after the side stream is done with them: pages
        # freed while a step is in flight are safe to reuse only because every layer joins here
        kern.join()
    if plan.dense_rows is None:
        return o if out is None else out.copy_(o)
    out.index_copy_(0, plan.dense_rows, o)
    # 3. decode rows: the INT4 decode kernel over the cache, their own token included
    if plan.decode_seqs is not None:
        lens = ops._i32(seq_lens, dev)
        od = kern.decode(qkv.index_select(0, plan.decode_rows), pool_layer,
                         tables.index_select(0, plan.decode_seqs),
                         lens.index_select(0, plan.decode_seqs), plan.max_decode)
        out.index_copy_(0, plan.decode_rows, od)
    return out


def attention_step(qkv, pool_layer, layout: PageLayout, num_q_heads: int, block_tables, seq_lens,
                   plan: PrefillPlan, max_seq_len: int | None = None, sm_scale=None, out=None,
                   backend: str = "auto"):
    """ops.attention_step with the fresh semantics: write every new token's K/V from
    qkv [T, (Hq + 2 Hkv) D] (after RoPE) into its slot, attend (dense rows: fresh K/V + cached
    prefix; decode rows: the decode kernel over the cache). Returns out [T, Hq*D].
    max_seq_len: unused (the plan holds the host-side bounds); ops.attention_step's argument."""
    d, hkv, hq = layout.head_dim, layout.num_kv_heads, num_q_heads
    t = qkv.shape[0]
    sm_scale = ops.default_sm_scale(layout) if sm_scale is None else sm_scale
    if not gpu_serves(layout, hq, qkv.dtype, qkv.device) or qkv.stride(-1) != 1:
        q = qkv[:, :hq * d].reshape(t, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d)
        v = qkv[:, (hq + hkv) * d:(hq + 2 * hkv) * d].reshape(t, hkv, d)
        kv_cache.write_kv(pool_layer, layout, k, v, plan.slots.long())
        res = reference.fresh_prefill_attention(q, k, v, pool_layer, layout, block_tables,
                                                seq_lens.cpu(), plan.q_lens, sm_scale)
        res = res.reshape(t, hq * d)
        return res if out is None else out.copy_(res)
    kern = StepKernels(layout, hq, qkv.dtype, qkv.device, sm_scale)
    return fused_step(kern, qkv, pool_layer, layout, hq, block_tables, seq_lens, plan, sm_scale,
                      out, backend)
