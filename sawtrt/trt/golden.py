"""Golden reference of one SawAttention call, in PyTorch (fp32 math), for tests and debugging.

Same inputs as the plugin (see core.py) as torch tensors on any device: write the new tokens'
K/V into `pool` (in place) with the reference quantizer, then attend with the reference paged
attention. Independent of the CUDA kernels and of sawtrt.kernels.ops."""
from __future__ import annotations

import torch

from .. import kv_cache, reference
from .params import AttentionParams


def step_slots(params: AttentionParams, block_tables, seq_lens, cu_q_lens) -> torch.Tensor:
    """Cache slot of every new token: sequence b's new tokens are its last q_len positions."""
    ps = params.page_size
    cu = [int(x) for x in cu_q_lens]
    out = []
    for b in range(len(cu) - 1):
        n, length = cu[b + 1] - cu[b], int(seq_lens[b])
        pos = torch.arange(length - n, length)
        out.append(block_tables[b].cpu()[pos // ps].long() * ps + pos % ps)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def sawattention(params: AttentionParams, qkv, pool, block_tables, seq_lens, cu_q_lens):
    """out [T, Hq*D] in qkv's dtype; `pool` ([P, Hkv, head_block_bytes] uint8) is updated."""
    layout = params.layout
    hq, hkv, d = params.num_q_heads, params.num_kv_heads, params.head_dim
    t = qkv.shape[0]
    q, k, v = qkv.float().split((hq * d, hkv * d, hkv * d), dim=-1)
    slots = step_slots(params, block_tables, seq_lens, cu_q_lens).to(pool.device)
    kv_cache.write_kv(pool, layout, k.reshape(t, hkv, d), v.reshape(t, hkv, d), slots)
    q_lens = (cu_q_lens[1:] - cu_q_lens[:-1]).cpu()
    # the query rounding of the kernel the library picks for this step (fp16 in prefill)
    out = reference.paged_attention(q.reshape(t, hq, d), pool, layout, block_tables, seq_lens,
                                    q_lens, params.scale,
                                    query_operand=reference.kernel_query_operand(q_lens))
    return out.reshape(t, hq * d).to(qkv.dtype)
