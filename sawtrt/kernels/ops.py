"""Attention-cache ops used by the runtime. Same signatures as the PyTorch reference
(sawtrt.kv_cache.write_kv, sawtrt.reference.paged_attention); CUDA tensors go to the compiled
kernels once they are bound here, everything else to the reference."""
from __future__ import annotations

from .. import kv_cache, reference


def available() -> bool:
    """True when the compiled kernels serve CUDA tensors."""
    return False


def write_kv(pool_layer, layout, k, v, slot_mapping):
    return kv_cache.write_kv(pool_layer, layout, k, v, slot_mapping)


def paged_attention(q, pool_layer, layout, block_tables, seq_lens, q_lens=None, sm_scale=None):
    return reference.paged_attention(q, pool_layer, layout, block_tables, seq_lens, q_lens,
                                     sm_scale)
