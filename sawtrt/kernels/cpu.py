"""The CPU path of the attention-cache ops: the reference's numbers with far fewer torch calls.

`write_kv` and `paged_attention` have the signatures of sawtrt.kv_cache.write_kv and
sawtrt.reference.paged_attention and the same semantics: the pool holds exactly the bytes the
reference writes (same `kv_cache.encode`), and attention reads them back through the same
`kv_cache.decode`. What changes is how bytes are addressed: whole pages and contiguous token rows
are sliced as views instead of gathered byte by byte, and K and V are encoded in one call;
attention is the reference's own loop over that gather, so results are bit-identical. On CPU
every torch call costs microseconds whatever its size, and the reference's per-byte index
tensors made one decode step of SmolLM2-135M cost ~5 ms per layer (2.5 ms write, 2.4 ms
attention) against ~1 ms of matmuls.
"""
from __future__ import annotations

import torch

from .. import kv_cache, reference
from ..spec import PageLayout


def _rows(pool_layer: torch.Tensor, layout: PageLayout, pages: torch.Tensor, region: int,
          width: int) -> torch.Tensor:
    """Bytes of `region` (width bytes per token) of `pages`, token-major: [len(pages) *
    page_size, Hkv, width] (a copy: one index_select of whole pages, then views)."""
    ps = layout.page_size
    blk = pool_layer.index_select(0, pages)[..., region:region + ps * width]
    return blk.reshape(len(pages), layout.num_kv_heads, ps, width).transpose(1, 2) \
        .reshape(len(pages) * ps, layout.num_kv_heads, width)


def gather_kv(pool_layer: torch.Tensor, layout: PageLayout, block_table: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_cache.gather_kv: dequantized (K, V) fp32 [length, Hkv, D] of one sequence."""
    pages = block_table[:-(-length // layout.page_size)].long()
    out = []
    for code_at, param_at in ((layout.k_codes, layout.k_params),
                              (layout.v_codes, layout.v_params)):
        codes = _rows(pool_layer, layout, pages, code_at, layout.code_bytes)[:length]
        params = (_rows(pool_layer, layout, pages, param_at, layout.param_bytes)[:length]
                  if layout.policy.quantized else None)
        out.append(kv_cache.decode(codes, params, layout))
    return out[0], out[1]


def write_kv(pool_layer: torch.Tensor, layout: PageLayout, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache.write_kv: encode k, v [T, Hkv, D] and store them at slot_mapping [T] (-1: skip)."""
    slots = slot_mapping.tolist()
    keep = [i for i, s in enumerate(slots) if s >= 0]
    if not keep:
        return
    if len(keep) != len(slots):
        idx = torch.tensor(keep)
        k, v, slots = k[idx], v[idx], [slots[i] for i in keep]
    policy = layout.policy
    rot = policy.rotated
    if rot == (rot and policy.rotate_v):            # K and V take the same path: encode once
        codes, params = kv_cache.encode(torch.stack((k, v)), layout, rot)
        kc, vc = codes
        kp, vp = params if params is not None else (None, None)
    else:
        kc, kp = kv_cache.encode(k, layout, rot)
        vc, vp = kv_cache.encode(v, layout, False)
    ps, cb, pb = layout.page_size, layout.code_bytes, layout.param_bytes
    # runs of consecutive slots inside one page are one contiguous store each
    i = 0
    while i < len(slots):
        page, off = divmod(slots[i], ps)
        j = i + 1
        while j < len(slots) and slots[j] == slots[j - 1] + 1 and slots[j] // ps == page:
            j += 1
        n = j - i
        row = pool_layer[page]                                   # [Hkv, head_block_bytes]
        for at, src, w in ((layout.k_codes, kc, cb), (layout.k_params, kp, pb),
                           (layout.v_codes, vc, cb), (layout.v_params, vp, pb)):
            if src is None:
                continue
            dst = row[:, at + off * w:at + (off + n) * w].view(layout.num_kv_heads, n, w)
            dst.copy_(src[i:j].transpose(0, 1))
        i = j


def paged_attention(q: torch.Tensor, pool_layer: torch.Tensor, layout: PageLayout,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    q_lens: torch.Tensor | None = None, sm_scale: float | None = None
                    ) -> torch.Tensor:
    """reference.paged_attention (fp32 math, exact fp32 query) over the page-slicing gather."""
    return reference.paged_attention(q, pool_layer, layout, block_tables, seq_lens, q_lens,
                                     sm_scale, gather=gather_kv)
