"""Reference paged attention over the SAW-INT4 cache (fp32 math), decode and chunked prefill.

This is the oracle for the CUDA kernels and the CPU fallback of the runtime. Convention
(write-then-attend, as in vLLM/TensorRT-LLM): the step's new K/V are written to the cache first,
then attention reads only the cache. Sequence b has seq_lens[b] tokens in the cache, the last
q_lens[b] of which are its new queries; new query i sits at position seq_lens[b] - q_lens[b] + i
and attends causally to positions <= its own. Decode is q_lens == 1.
"""
from __future__ import annotations

import math

import torch

from . import hadamard
from .kv_cache import gather_kv
from .spec import PageLayout


FP16_MAX = 65504.0


def kernel_query_operand(q_lens) -> torch.dtype | None:
    """What the CUDA library rounds the rotated query to in a step with these new-token counts:
    fp16 when the step goes to the prefill kernel, None (fp32) when it goes to the decode kernel
    (c_api.cu: exactly one new token for every sequence)."""
    lens = [int(n) for n in q_lens]
    return None if all(n == 1 for n in lens) else torch.float16


def rotate_query(q: torch.Tensor, layout: PageLayout,
                 operand: torch.dtype | None = None) -> torch.Tensor:
    """q [..., D] in fp32, in the cache's K basis. `operand=torch.float16` also rounds it as the
    prefill kernel's tensor-core operand is rounded (clamped to fp16's range, then to nearest):
    that rounding is part of the prefill contract; decode and the CPU runtime keep fp32."""
    if operand not in (None, torch.float16):
        raise ValueError(f"query operand must be None or torch.float16, got {operand}")
    p = layout.policy
    qr = q.float() if not p.rotated else hadamard.rotate(q, p.rotation_block,
                                                         p.signs(layout.head_dim))
    if operand is not None:
        qr = qr.clamp(-FP16_MAX, FP16_MAX).to(operand).float()
    return qr


def unrotate_output(o: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    p = layout.policy
    if not (p.rotated and p.rotate_v):
        return o
    return hadamard.inverse_rotate(o, p.rotation_block, p.signs(layout.head_dim))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                    sm_scale: float) -> torch.Tensor:
    """Causal GQA attention in fp32. q [n, Hq, D] at positions q_start.., k/v [L, Hkv, D]."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)            # [L, Hq, D]
    vv = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kk) * sm_scale
    qpos = torch.arange(q_start, q_start + n, device=q.device)[:, None]
    kpos = torch.arange(k.shape[0], device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), vv)


def paged_attention(q: torch.Tensor, pool_layer: torch.Tensor, layout: PageLayout,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    q_lens: torch.Tensor | None = None, sm_scale: float | None = None,
                    query_operand: torch.dtype | None = None, gather=gather_kv) -> torch.Tensor:
    """Attention of the step's queries over the paged cache.

    q            [sum(q_lens), Hq, D] (any float dtype), sequences back to back
    block_tables [B, max_pages] int32, seq_lens [B] int32 (tokens in cache, new ones included)
    q_lens       [B] new tokens per sequence (default: all 1, i.e. decode)
    query_operand  torch.float16 to model the prefill kernel (rotated query rounded to fp16),
                 None for exact fp32 (see rotate_query)
    gather       (pool_layer, layout, block_table, length) -> fp32 (K, V) of one sequence:
                 kv_cache.gather_kv (byte by byte), or the CPU path's page slicing (same values)
    returns      [sum(q_lens), Hq, D] in q's dtype
    """
    if q.shape[-1] != layout.head_dim:
        raise ValueError(f"query head_dim {q.shape[-1]} != cache head_dim {layout.head_dim}")
    if q.shape[1] % layout.num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads do not group over {layout.num_kv_heads} KV heads")
    batch = seq_lens.shape[0]
    q_lens = torch.ones(batch, dtype=torch.int32) if q_lens is None else q_lens
    if int(q_lens.sum()) != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens but q_lens sums to {int(q_lens.sum())}")
    sm_scale = 1.0 / math.sqrt(layout.head_dim) if sm_scale is None else sm_scale
    qr = rotate_query(q, layout, query_operand)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    start = 0
    for b in range(batch):
        n, length = int(q_lens[b]), int(seq_lens[b])
        if n > length:
            raise ValueError(f"sequence {b}: {n} new tokens but only {length} in the cache")
        k, v = gather(pool_layer, layout, block_tables[b], length)
        out[start:start + n] = dense_attention(qr[start:start + n], k, v, length - n, sm_scale)
        start += n
    return unrotate_output(out, layout).to(q.dtype)


def gather_kv_unrotated(pool_layer: torch.Tensor, layout: PageLayout, block_table: torch.Tensor,
                        length: int):
    """gather_kv in the original basis: fp32 (K, V) [length, Hkv, D] with the BDR rotation undone
    (K always, V when rotate_v), what the dense prefill's prefix rows hold before rounding."""
    k, v = gather_kv(pool_layer, layout, block_table, length)
    p = layout.policy
    if p.rotated:
        signs = p.signs(layout.head_dim)
        k = hadamard.inverse_rotate(k, p.rotation_block, signs)
        if p.rotate_v:
            v = hadamard.inverse_rotate(v, p.rotation_block, signs)
    return k, v


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            pool_layer: torch.Tensor, layout: PageLayout,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, q_lens,
                            sm_scale: float | None = None,
                            prefix_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention with the fresh-K/V prefill semantics (the runtime's default; paged_attention is
    the quantized-read semantics).

    A sequence with q_lens[b] >= 2 new tokens (a prompt or a prompt chunk): its queries attend
    causally to the cached prefix (positions < seq_lens[b] - q_lens[b], read from the cache and
    dequantized) and to the step's own k, v as given, unquantized. A sequence with one new token
    (decode) reads its whole context from the cache, its own token included, exactly as
    paged_attention (its K/V must be written first).

    q [sum(q_lens), Hq, D], k / v [sum(q_lens), Hkv, D], sequences back to back; fp32 math;
    returns [sum(q_lens), Hq, D] in q's dtype. prefix_dtype: round the dequantized, un-rotated
    prefix to it, as the GPU path's tensor-core operands are (None: exact fp32).
    """
    if q.shape[-1] != layout.head_dim or k.shape[-1] != layout.head_dim:
        raise ValueError(f"head_dim of q {q.shape[-1]} / k {k.shape[-1]} != cache head_dim "
                         f"{layout.head_dim}")
    lens = [int(n) for n in q_lens]
    if sum(lens) != q.shape[0] or k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"q / k / v have {q.shape[0]} / {k.shape[0]} / {v.shape[0]} tokens but "
                         f"q_lens sums to {sum(lens)}")
    sm_scale = 1.0 / math.sqrt(layout.head_dim) if sm_scale is None else sm_scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    start = 0
    for b, n in enumerate(lens):
        length = int(seq_lens[b])
        if n > length:
            raise ValueError(f"sequence {b}: {n} new tokens but only {length} in the cache")
        rows = slice(start, start + n)
        if n == 1:
            out[rows] = paged_attention(q[rows], pool_layer, layout, block_tables[b:b + 1],
                                        seq_lens[b:b + 1], None, sm_scale)
        else:
            kp, vp = gather_kv_unrotated(pool_layer, layout, block_tables[b], length - n)
            if prefix_dtype is not None:
                kp, vp = kp.to(prefix_dtype).float(), vp.to(prefix_dtype).float()
            kk = torch.cat((kp, k[rows].float()), 0)
            vv = torch.cat((vp, v[rows].float()), 0)
            out[rows] = dense_attention(q[rows].float(), kk, vv, length - n, sm_scale).to(q.dtype)
        start += n
    return out
