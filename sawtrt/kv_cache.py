"""The paged KV cache in PyTorch: page allocator, pool, reference write ("append") and gather.

Shapes: a pool is uint8 [num_layers, num_pages, num_kv_heads, head_block_bytes] (spec.py has the
in-page layout); `pool[layer]` is what the kernels and the TensorRT plugin get for one layer.
A policy with per-layer page formats (KVPolicy.layer_pages) has layers of different widths: its
pool is a list of per-layer tensors [num_pages, num_kv_heads, head_block_bytes of the layer],
indexed the same way (`pool[layer]`); `pool_pages` / `pool_nbytes` read either form.
These functions are the reference the CUDA write kernel is checked against, bit for bit, and the
CPU fallback of the runtime.
"""
from __future__ import annotations

import torch

from . import hadamard, quant
from .spec import PageLayout


class KVPoolExhausted(RuntimeError):
    """The page pool has fewer free pages than a request needs. Nothing was allocated."""


class PageAllocator:
    """Free-list allocator over page ids [0, num_pages). allocate() is all-or-nothing."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("a pool needs at least one page")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))   # pop() hands out low ids first
        self._used = bytearray(num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise KVPoolExhausted(
                f"KV page pool exhausted: {n} pages requested, {len(self._free)} of "
                f"{self.num_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._used[p] = 1
        return pages

    def free(self, pages) -> None:
        pages = list(pages)
        for p in pages:   # validate everything before changing anything
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page id {p} outside the pool [0, {self.num_pages})")
            if not self._used[p]:
                raise ValueError(f"page {p} freed twice (or never allocated)")
        if len(set(pages)) != len(pages):
            raise ValueError("the same page appears twice in one free()")
        for p in pages:
            self._used[p] = 0
            self._free.append(p)


def new_pool(layout: PageLayout, num_layers: int, num_pages: int, device=None,
             poison: int | None = None):
    """Allocate a pool: one uint8 tensor [num_layers, num_pages, Hkv, head_block_bytes], or for a
    layout with per-layer page formats a list of num_layers tensors [num_pages, Hkv, bytes of
    that layer]. `poison` fills it with one byte value (tests use it)."""
    def alloc(shape):
        if poison is None:
            return torch.zeros(shape, dtype=torch.uint8, device=device)
        return torch.full(shape, poison, dtype=torch.uint8, device=device)

    if layout.mixed:
        return [alloc((num_pages, lay.num_kv_heads, lay.head_block_bytes))
                for lay in layout.layers(num_layers)]
    return alloc((num_layers, num_pages, layout.num_kv_heads, layout.head_block_bytes))


def pool_pages(pool) -> int:
    """Pages per layer of a pool from `new_pool` (either form)."""
    return pool[0].shape[0]


def pool_nbytes(pool) -> int:
    """Bytes of a pool from `new_pool` (either form)."""
    return pool.nbytes if isinstance(pool, torch.Tensor) else sum(t.nbytes for t in pool)


def _byte_index(layout: PageLayout, slots: torch.Tensor, region: int, width: int):
    """Index tuple selecting `width` bytes at `region` of each slot's row, for every KV head:
    use as pool_layer[idx] -> [n, Hkv, width]."""
    dev = slots.device
    page = (slots // layout.page_size).long()
    off = (slots % layout.page_size).long()
    heads = torch.arange(layout.num_kv_heads, device=dev)
    cols = region + off[:, None, None] * width + torch.arange(width, device=dev)
    return page[:, None, None], heads[None, :, None], cols


def encode(x: torch.Tensor, layout: PageLayout, rotated: bool):
    """Encode [n, Hkv, D] (K or V) to (code bytes [n, Hkv, code_bytes], param bytes or None)."""
    policy = layout.policy
    x = quant.sanitize(x)
    if rotated:
        x = hadamard.rotate(x, policy.rotation_block, policy.signs(layout.head_dim))
    if not policy.quantized:
        return x.bfloat16().view(torch.uint8), None
    codes, scale, offset = quant.quantize(x, policy.bits)
    if policy.bits == 4:
        codes = quant.pack_int4(codes)
    params = torch.stack((scale, offset), dim=-1).view(torch.uint8)
    return codes, params


def decode(codes: torch.Tensor, params: torch.Tensor | None, layout: PageLayout) -> torch.Tensor:
    """Inverse of `encode` up to quantization: fp32 [n, Hkv, D], still in the rotated basis."""
    policy = layout.policy
    if not policy.quantized:
        return codes.contiguous().view(torch.bfloat16).float()
    if policy.bits == 4:
        codes = quant.unpack_int4(codes)
    sm = params.contiguous().view(torch.float16)
    return quant.dequantize(codes, sm[..., 0], sm[..., 1])


def write_kv(pool_layer: torch.Tensor, layout: PageLayout, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Reference "append": rotate + quantize k, v [T, Hkv, D] and store them at their slots.

    Slots < 0 are skipped (padding). The pool is modified in place.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if slots.numel() == 0:
        return
    k, v = k[keep], v[keep]
    policy = layout.policy
    for x, code_at, param_at, rotated in ((k, layout.k_codes, layout.k_params, policy.rotated),
                                          (v, layout.v_codes, layout.v_params,
                                           policy.rotated and policy.rotate_v)):
        codes, params = encode(x, layout, rotated)
        pool_layer[_byte_index(layout, slots, code_at, layout.code_bytes)] = codes
        if params is not None:
            pool_layer[_byte_index(layout, slots, param_at, layout.param_bytes)] = params


def gather_kv(pool_layer: torch.Tensor, layout: PageLayout, block_table: torch.Tensor,
              length: int):
    """Dequantized (K, V) of the first `length` tokens of one sequence: fp32 [length, Hkv, D],
    in the rotated basis (K rotated for int4-bdr, V too when rotate_v)."""
    pos = torch.arange(length, device=block_table.device)
    slots = block_table[pos // layout.page_size].long() * layout.page_size + pos % layout.page_size
    out = []
    for code_at, param_at in ((layout.k_codes, layout.k_params), (layout.v_codes, layout.v_params)):
        codes = pool_layer[_byte_index(layout, slots, code_at, layout.code_bytes)]
        params = (pool_layer[_byte_index(layout, slots, param_at, layout.param_bytes)]
                  if layout.policy.quantized else None)
        out.append(decode(codes, params, layout))
    return out[0], out[1]


class PagedKVCache:
    """All layers' pools plus one allocator (page ids are shared across layers)."""

    def __init__(self, layout: PageLayout, num_layers: int, num_pages: int, device=None):
        self.layout = layout
        self.num_layers = num_layers
        self.pool = new_pool(layout, num_layers, num_pages, device)
        self.allocator = PageAllocator(num_pages)

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    def layer(self, i: int) -> torch.Tensor:
        return self.pool[i]

    def layer_layout(self, i: int) -> PageLayout:
        return self.layout.for_layer(i)
