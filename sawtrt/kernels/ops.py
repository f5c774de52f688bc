"""Attention-cache ops used by the runtime. Same signatures as the PyTorch reference
(sawtrt.kv_cache.write_kv, sawtrt.reference.paged_attention); CUDA tensors go to the compiled
kernels (libsawtrt_kernels.so, see library.py) when the library is present and the configuration
has an instantiation, everything else to the reference.

The GPU path never synchronizes with the host (no .item(), no host copies), so it can be captured
in a CUDA graph: give host-side upper bounds (max_q_len, max_seq_len) where the defaults would
need to look at device data, and call once before capture so the workspace is allocated.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
from dataclasses import dataclass

import torch

from .. import kv_cache, reference
from ..spec import PageLayout
from . import capi, cpu, library
from .linear import rms_norm

_workspaces: dict[int, torch.Tensor] = {}       # device index -> uint8 buffer, grown on demand
_outgrown: list[torch.Tensor] = []              # replaced buffers, kept alive (see _workspace)
_signs: dict[tuple, torch.Tensor] = {}           # (seed, D, device index) -> float32 [D]


def available() -> bool:
    """True when the compiled kernels serve CUDA tensors."""
    return torch.cuda.is_available() and library.try_load() is not None


def _on_cpu(*tensors) -> bool:
    """All CPU tensors: the reference's numbers through sawtrt.kernels.cpu (fewer torch calls)."""
    return all(t.device.type == "cpu" for t in tensors)


def _signs_ptr(layout: PageLayout, device: torch.device) -> int:
    if layout.policy.sign_seed is None:
        return 0
    key = (layout.policy.sign_seed, layout.head_dim, device.index)
    buf = _signs.get(key)
    if buf is None:
        buf = _signs[key] = layout.policy.signs(layout.head_dim).to(device)
    return buf.data_ptr()


@dataclass(frozen=True)
class KernelPlan:
    """What the library said, once, about one configuration (FlashInfer's plan/run split: the
    probe runs at the first call of a configuration, normally while the model is set up; every
    later call of every layer is a dictionary lookup)."""
    cfg: library.SawConfig      # passed by reference to every call (the library only reads it)
    decode: bool                # the decode kernel serves it too (saw_decode_supported)


_plans: dict[tuple, KernelPlan | None] = {}


def plan(layout: PageLayout, num_q_heads: int, dtype, device,
         sm_scale: float | None = None) -> KernelPlan | None:
    """The library's plan for this configuration, or None when the kernels don't serve it (no
    library, CPU tensors, fp32 activations, a head_dim/group without an instantiation). The
    probe (saw_page_layout validates the config against the instantiations) runs once per
    configuration and library; later calls are one dictionary lookup (~2 us)."""
    key = (layout, num_q_heads, dtype, device, sm_scale, library._LIB)
    try:
        return _plans[key]
    except KeyError:
        pass
    device = torch.device(device)
    if device.type != "cuda" or library.act_dtype_code(dtype) is None:
        _plans[key] = None
        return None
    lib = library.try_load()
    if lib is None:
        return None     # not remembered: a library built later in this process is found
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = library.make_config(layout, num_q_heads, dtype, sm_scale, _signs_ptr(layout, device))
    probe = library.SawPageLayout()
    if lib.saw_page_layout(ctypes.byref(cfg), ctypes.byref(probe)):
        result = None   # validation says no instantiation: the reference serves it
    else:
        result = KernelPlan(cfg, library.decode_supported(cfg, lib))
    _plans[key] = _plans[key[:-1] + (lib,)] = result
    return result


def kernel_config(layout: PageLayout, num_q_heads: int, dtype, device,
                  sm_scale: float | None = None) -> library.SawConfig | None:
    """The library's config for this call (from the cached plan), or None when the kernels
    don't serve it."""
    p = plan(layout, num_q_heads, dtype, device, sm_scale)
    return None if p is None else p.cfg


def fused_step_config(layout: PageLayout, num_q_heads: int, dtype, device,
                      sm_scale: float | None = None) -> library.SawConfig | None:
    """kernel_config, when the library also serves this layout's decode (attention_step has no
    fallback: a library built before int8 decode must not get int8 layers)."""
    p = plan(layout, num_q_heads, dtype, device, sm_scale)
    return p.cfg if p is not None and p.decode else None


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _workspaces.get(idx)
    if buf is None or buf.numel() < nbytes:
        if buf is not None:
            # CUDA graphs captured earlier hold this buffer's address: freeing it would let
            # their replays write into memory the allocator has handed out or released (an
            # illegal address at 256 x 8K-token sequences on the H200, 2026-11-29). Outgrown
            # buffers are kept for the life of the process; growth at least doubles, so they
            # add up to less than the live buffer.
            _outgrown.append(buf)
        buf = _workspaces[idx] = torch.empty(max(nbytes, 2 * buf.numel() if buf is not None
                                                 else 1 << 20), dtype=torch.uint8, device=device)
    return buf


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _i32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int32).contiguous()


def write_kv(pool_layer, layout, k, v, slot_mapping):
    """Rotate + quantize k, v [T, Hkv, D] and store them at slot_mapping [T] (-1: skip)."""
    cfg = kernel_config(layout, layout.num_kv_heads, k.dtype, k.device)
    if cfg is None or v.dtype != k.dtype or pool_layer.device != k.device:
        if _on_cpu(pool_layer, k, slot_mapping):
            return cpu.write_kv(pool_layer, layout, k, v, slot_mapping)
        return kv_cache.write_kv(pool_layer, layout, k, v, slot_mapping)
    t = k.shape[0]
    # the kernel reads the fused projection layout [T, (Hq + 2 Hkv) D]; a Q slot of Hkv heads
    # (never read) makes separate k and v fit it
    qkv = torch.empty(t, 3, layout.num_kv_heads * layout.head_dim, dtype=k.dtype, device=k.device)
    qkv[:, 1] = k.reshape(t, -1)
    qkv[:, 2] = v.reshape(t, -1)
    slots = _i32(slot_mapping, k.device)
    lib = library.load()
    library.check(lib.saw_write_kv(ctypes.byref(cfg), qkv.data_ptr(), qkv.stride(0),
                                   slots.data_ptr(), t, pool_layer.data_ptr(),
                                   _stream(k.device)), lib)


def paged_attention(q, pool_layer, layout, block_tables, seq_lens, q_lens=None, sm_scale=None,
                    *, max_q_len: int | None = None, max_seq_len: int | None = None):
    """Attention of the step's queries q [sum(q_lens), Hq, D] over the paged cache; see
    reference.paged_attention. Kernels: decode when q_lens is None (or max_q_len == 1 and one
    token per sequence), else prefill. max_q_len / max_seq_len: host-side upper bounds (defaults
    need no device data: q.shape[0] and block_tables.shape[1] * page_size)."""
    cfg = kernel_config(layout, q.shape[1], q.dtype, q.device, sm_scale)
    if cfg is None or pool_layer.device != q.device or q.shape[-1] != layout.head_dim:
        if _on_cpu(q, pool_layer, block_tables, seq_lens):
            return cpu.paged_attention(q, pool_layer, layout, block_tables, seq_lens, q_lens,
                                       sm_scale)
        return reference.paged_attention(q, pool_layer, layout, block_tables, seq_lens, q_lens,
                                         sm_scale)
    dev = q.device
    n, hq, d = q.shape
    batch = seq_lens.shape[0]
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    tables, lens = _i32(block_tables, dev), _i32(seq_lens, dev)
    max_pages = tables.shape[1]
    max_seq_len = max_pages * layout.page_size if max_seq_len is None else max_seq_len
    if max_q_len is None:   # any q_len <= its seq_len <= max_seq_len: a bound needing no sync
        max_q_len = 1 if q_lens is None else (int(q_lens.max()) if q_lens.device.type == "cpu"
                                              else min(n, max_seq_len))
    out = torch.empty(n, hq, d, dtype=q.dtype, device=dev)
    lib = library.load()
    stream = _stream(dev)
    ws_bytes = capi.workspace_bytes(cfg, batch, n, max_seq_len)
    ws = _workspace(dev, ws_bytes)
    if max_q_len == 1 and n == batch:
        code = lib.saw_decode(ctypes.byref(cfg), q.data_ptr(), q.stride(0), pool_layer.data_ptr(),
                              tables.data_ptr(), max_pages, lens.data_ptr(), batch, max_seq_len,
                              out.data_ptr(), ws.data_ptr(), ws.numel(), stream)
        if code != library.ERR_UNSUPPORTED:   # a library without decode falls through to prefill
            library.check(code, lib)
            return out
    if q_lens is None:
        q_lens = torch.ones(batch, dtype=torch.int32, device=dev)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(_i32(q_lens, dev), 0)
    library.check(lib.saw_prefill(ctypes.byref(cfg), q.data_ptr(), q.stride(0),
                                  pool_layer.data_ptr(), tables.data_ptr(), max_pages,
                                  lens.data_ptr(), cu.data_ptr(), batch, n, max_q_len,
                                  max_seq_len, out.data_ptr(), ws.data_ptr(), ws.numel(), stream),
                  lib)
    return out


def step_slots(layout: PageLayout, block_tables, seq_lens, cu_q_lens, num_tokens: int):
    """Slot of each new token (reference form of the write kernel's StepSlot); -1 padding."""
    dev = block_tables.device
    slots = torch.full((num_tokens,), -1, dtype=torch.int64, device=dev)
    cu = cu_q_lens.long().tolist()
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        pos = torch.arange(int(seq_lens[b]) - n, int(seq_lens[b]), device=dev)
        slots[cu[b]:cu[b + 1]] = (block_tables[b, pos // layout.page_size].long()
                                  * layout.page_size + pos % layout.page_size)
    return slots


@dataclass(frozen=True)
class QKPrologue:
    """What a Qwen3 / Llama layer does to q and k between the q/k/v projection and attention:
    RMSNorm of every query and key head (weights [D], None: no norm) and rotate-half RoPE
    (cos / sin [T, D] rows of the step's positions, None: no RoPE). attention_step runs it in
    its write kernel (saw_attention_step_qk) and writes the results back into qkv."""
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    eps: float
    cos: torch.Tensor | None
    sin: torch.Tensor | None

    def __post_init__(self):
        if (self.cos is None) != (self.sin is None):
            raise ValueError("QKPrologue: RoPE needs both cos and sin (or neither)")

    def apply_(self, qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int,
               head_dim: int) -> None:
        """The prologue in torch, in place on qkv's q and k columns: fp32 with the kernel's
        roundings (c_api.h SawQKPrologue)."""
        t, d = qkv.shape[0], head_dim
        for col, heads, w in ((0, num_q_heads, self.q_norm),
                              (num_q_heads * d, num_kv_heads, self.k_norm)):
            x = qkv[:, col:col + heads * d].view(t, heads, d)
            y = x.float()
            if w is not None:
                y = rms_norm(x, w, self.eps).to(x.dtype).float()
            if self.cos is not None:
                rot = torch.cat((-y[..., d // 2:], y[..., :d // 2]), -1)
                y = y * self.cos[:, None, :].float() + rot * self.sin[:, None, :].float()
            x.copy_(y.to(x.dtype))

    def struct(self, qkv: torch.Tensor, head_dim: int) -> library.SawQKPrologue | None:
        """The C ABI's view of it for this qkv, or None when a tensor is not in the form the
        kernel takes (dtype, device, shape, contiguous rows)."""
        def ok(w, shape):
            return w is None or (w.dtype == qkv.dtype and w.device == qkv.device
                                 and tuple(w.shape) == shape and w.stride(-1) == 1)
        rows = (qkv.shape[0], head_dim)
        if not (ok(self.cos, rows) and ok(self.sin, rows) and ok(self.q_norm, (head_dim,))
                and ok(self.k_norm, (head_dim,))
                and (self.cos is None or self.cos.stride(0) == self.sin.stride(0) >= head_dim)):
            return None
        ptr = (lambda w: None if w is None else w.data_ptr())
        return library.SawQKPrologue(
            q_norm=ptr(self.q_norm), k_norm=ptr(self.k_norm), norm_eps=self.eps,
            rope_cos=ptr(self.cos), rope_sin=ptr(self.sin),
            rope_stride=self.cos.stride(0) if self.cos is not None else 0)


def prologue_supported(device) -> bool:
    """Whether attention_step runs a QKPrologue in its kernel on this device (else in torch)."""
    lib = library.try_load() if torch.device(device).type == "cuda" else None
    return lib is not None and hasattr(lib, "saw_attention_step_qk")


def attention_step(qkv, pool_layer, layout, num_q_heads, block_tables, seq_lens, cu_q_lens,
                   max_q_len: int, max_seq_len: int | None = None, sm_scale=None, out=None,
                   plan=None, prologue: QKPrologue | None = None):
    """One attention layer for a mixed batch, fused (what the runtime and the TensorRT plugin
    run): write the new tokens' K/V from qkv [T, (Hq + 2 Hkv) D] (after RoPE) into their slots
    (derived from block_tables / seq_lens / cu_q_lens), then attend. Returns out [T, Hq*D].
    max_q_len: host-side max of the q_lens (1 selects the decode kernel when T == batch).
    plan: a dense_prefill.PrefillPlan of the step for the fresh-K/V prefill semantics (prompt
    tokens attend to their own unquantized K/V at dense speed); None: every position is read
    from the quantized cache. prologue: qkv is the raw projection and q/k-norm and RoPE run
    here (in the write kernel where the library has it), leaving their results in qkv."""
    d, hkv = layout.head_dim, layout.num_kv_heads
    cfg = kernel_config(layout, num_q_heads, qkv.dtype, qkv.device, sm_scale)
    pro = None
    if prologue is not None:
        if plan is None and cfg is not None and qkv.stride(-1) == 1 \
                and prologue_supported(qkv.device):
            pro = prologue.struct(qkv, d)
        if pro is None:
            prologue.apply_(qkv, num_q_heads, hkv, d)
    if plan is not None:
        from . import dense_prefill
        return dense_prefill.attention_step(qkv, pool_layer, layout, num_q_heads, block_tables,
                                            seq_lens, plan, max_seq_len, sm_scale, out)
    t = qkv.shape[0]
    if cfg is None or qkv.stride(-1) != 1:
        slots = step_slots(layout, block_tables, seq_lens, cu_q_lens, t)
        k = qkv[:, num_q_heads * d:(num_q_heads + hkv) * d].reshape(t, hkv, d)
        v = qkv[:, (num_q_heads + hkv) * d:(num_q_heads + 2 * hkv) * d].reshape(t, hkv, d)
        kv_cache.write_kv(pool_layer, layout, k, v, slots)
        q = qkv[:, :num_q_heads * d].reshape(t, num_q_heads, d)
        res = reference.paged_attention(q, pool_layer, layout, block_tables, seq_lens,
                                        (cu_q_lens[1:] - cu_q_lens[:-1]).cpu(), sm_scale)
        res = res.reshape(t, num_q_heads * d)
        if out is not None:
            out.copy_(res)
            return out
        return res
    dev = qkv.device
    tables, lens, cu = _i32(block_tables, dev), _i32(seq_lens, dev), _i32(cu_q_lens, dev)
    batch, max_pages = lens.shape[0], tables.shape[1]
    max_seq_len = max_pages * layout.page_size if max_seq_len is None else max_seq_len
    if out is None:
        out = torch.empty(t, num_q_heads * d, dtype=qkv.dtype, device=dev)
    lib = library.load()
    ws_bytes = capi.workspace_bytes(cfg, batch, t, max_seq_len)
    ws = _workspace(dev, ws_bytes)
    args = (pool_layer.data_ptr(), tables.data_ptr(), max_pages, lens.data_ptr(), cu.data_ptr(),
            batch, t, max_q_len, max_seq_len, out.data_ptr(), ws.data_ptr(), ws.numel(),
            _stream(dev))
    if pro is None:
        library.check(lib.saw_attention_step(ctypes.byref(cfg), qkv.data_ptr(), qkv.stride(0),
                                             *args), lib)
    else:
        library.check(lib.saw_attention_step_qk(ctypes.byref(cfg), qkv.data_ptr(),
                                                qkv.stride(0), ctypes.byref(pro), *args), lib)
    return out


def default_sm_scale(layout: PageLayout) -> float:
    return 1.0 / math.sqrt(layout.head_dim)


# -- torch custom ops: the same kernels as opaque ops (torch.compile / graph friendly) ----------
@functools.lru_cache(maxsize=64)
def _layout_from_json(text: str) -> PageLayout:
    return PageLayout.from_dict(json.loads(text))


def _register_custom_ops() -> bool:
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:   # torch < 2.4
        return False

    @custom_op("sawtrt::attention_step", mutates_args=("pool_layer",))
    def _attention_step_op(qkv: torch.Tensor, pool_layer: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           cu_q_lens: torch.Tensor, layout_json: str, num_q_heads: int,
                           max_q_len: int, max_seq_len: int, sm_scale: float) -> torch.Tensor:
        return attention_step(qkv, pool_layer, _layout_from_json(layout_json), num_q_heads,
                              block_tables, seq_lens, cu_q_lens, max_q_len, max_seq_len,
                              sm_scale)

    @_attention_step_op.register_fake
    def _(qkv, pool_layer, block_tables, seq_lens, cu_q_lens, layout_json, num_q_heads,
          max_q_len, max_seq_len, sm_scale):
        d = _layout_from_json(layout_json).head_dim
        return qkv.new_empty(qkv.shape[0], num_q_heads * d)

    @custom_op("sawtrt::write_kv", mutates_args=("pool_layer",))
    def _write_kv_op(pool_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     slot_mapping: torch.Tensor, layout_json: str) -> None:
        write_kv(pool_layer, _layout_from_json(layout_json), k, v, slot_mapping)

    @_write_kv_op.register_fake
    def _(pool_layer, k, v, slot_mapping, layout_json):
        return None

    return True


# torch.ops.sawtrt.attention_step(qkv, pool, tables, lens, cu, layout.to_json(), Hq, max_q_len,
# max_seq_len, sm_scale) and torch.ops.sawtrt.write_kv(pool, k, v, slots, layout.to_json())
CUSTOM_OPS = _register_custom_ops()
