import math
import random
import zlib

import pytest
import torch

from sawtrt import hadamard, kv_cache, quant, reference
from sawtrt.kv_cache import (KVPoolExhausted, PageAllocator, PagedKVCache, gather_kv, new_pool,
                             write_kv)
from sawtrt.reference import dense_attention, paged_attention
from sawtrt.spec import KVPolicy, PageLayout

POLICIES = ["bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=16,kv,seed=3", "int4-bdr:h=32,seed=1"]


def test_allocator_invariants_under_random_operations():
    rng = random.Random(0)
    alloc = PageAllocator(257)
    owned: list[list[int]] = []
    for _ in range(5000):
        if owned and rng.random() < 0.45:
            alloc.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randint(0, 9)
            if n > alloc.num_free:
                before = alloc.num_free
                with pytest.raises(KVPoolExhausted, match="exhausted"):
                    alloc.allocate(n)
                assert alloc.num_free == before      # all-or-nothing
            else:
                owned.append(alloc.allocate(n))
        flat = [p for pages in owned for p in pages]
        assert len(flat) == len(set(flat)) == alloc.num_used
        assert alloc.num_used + alloc.num_free == 257
    for pages in owned:
        alloc.free(pages)
    assert alloc.num_free == 257


def test_allocator_rejects_bad_frees_without_changing_state():
    alloc = PageAllocator(8)
    pages = alloc.allocate(3)
    with pytest.raises(ValueError, match="twice"):
        alloc.free([pages[0], pages[0]])
    with pytest.raises(ValueError, match="outside"):
        alloc.free([99])
    assert alloc.num_used == 3
    alloc.free(pages)
    with pytest.raises(ValueError, match="twice"):
        alloc.free(pages[:1])


def _fake_quant(x, layout, rotated):
    """Dense path: sanitize, rotate, quantize, dequantize, rotate back. The forward rotation is
    the spec's fp32 one (an fp64 rotation would move rounding ties by one code); the paging,
    packing and params storage under test are not used."""
    p = layout.policy
    x = quant.sanitize(x)
    signs = p.signs(layout.head_dim)
    if rotated:
        x = hadamard.rotate(x, p.rotation_block, signs)
    if p.quantized:
        codes, s, m = quant.quantize(x, p.bits)
        x = quant.dequantize(codes, s, m)
    else:
        x = x.bfloat16().float()
    if rotated:
        x = hadamard.inverse_rotate(x.double(), p.rotation_block, signs).float()
    return x


def _scatter(length, page_size, num_pages, gen):
    table = torch.randperm(num_pages, generator=gen)[: -(-length // page_size)].int()
    pos = torch.arange(length)
    return table, table[pos // page_size] * page_size + pos % page_size


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("page_size", [16, 64])
def test_write_then_gather_round_trip(policy, page_size):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{policy}{page_size}".encode()))
    layout = PageLayout(KVPolicy.parse(policy), 64, 3, page_size)
    pool = new_pool(layout, 1, 40, poison=0xA5)[0]
    k, v = torch.randn(97, 3, 64, generator=gen), torch.randn(97, 3, 64, generator=gen)
    table, slots = _scatter(97, page_size, 40, gen)
    write_kv(pool, layout, k, v, slots)
    kh, vh = gather_kv(pool, layout, table, 97)
    p = layout.policy
    if p.rotated:   # gather returns the rotated basis
        kh = hadamard.inverse_rotate(kh, p.rotation_block, p.signs(64))
        if p.rotate_v:
            vh = hadamard.inverse_rotate(vh, p.rotation_block, p.signs(64))
    torch.testing.assert_close(kh, _fake_quant(k, layout, p.rotated), rtol=0, atol=1e-4)
    torch.testing.assert_close(vh, _fake_quant(v, layout, p.rotated and p.rotate_v),
                               rtol=0, atol=1e-4)


def test_padding_slots_are_skipped_and_other_pages_untouched():
    layout = PageLayout(KVPolicy.parse("int4-bdr"), 64, 2, 16)
    pool = new_pool(layout, 1, 4, poison=0x5A)[0]
    k = torch.randn(3, 2, 64)
    write_kv(pool, layout, k, k, torch.tensor([17, -1, 18]))
    assert torch.all(pool[0] == 0x5A) and torch.all(pool[2:] == 0x5A)
    page1 = pool[1].reshape(2, -1)
    assert torch.all(page1[:, layout.k_codes + 3 * 32: layout.k_params] == 0x5A)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (16, 2), (16, 1)])
def test_paged_attention_equals_dense_attention_on_dequantized_cache(policy, hq, hkv):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{policy}{hq}{hkv}".encode()))
    d, page = 64, 16
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    pool = new_pool(layout, 1, 64, poison=0xFF)[0]
    # mixed batch: a decode token, a prefill chunk crossing page boundaries over a cached
    # prefix, a prompt shorter than one page, a full-length prefill
    lens, qlens = [54, 97, 1, 33], [1, 20, 1, 33]
    tables, qs, refs = [], [], []
    for n, nq in zip(lens, qlens):
        k, v = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
        k[..., 5] += 30.0                                  # an outlier channel
        table, slots = _scatter(n, page, 64 // len(lens), gen)
        table = table + 16 * len(tables)                   # disjoint page ranges
        slots = slots + 16 * len(tables) * page
        write_kv(pool, layout, k, v, slots)
        q = torch.randn(nq, hq, d, generator=gen)
        kh = _fake_quant(k, layout, layout.policy.rotated)
        vh = _fake_quant(v, layout, layout.policy.rotated and layout.policy.rotate_v)
        refs.append(dense_attention(q.double(), kh.double(), vh.double(), n - nq, d ** -0.5))
        tables.append(torch.nn.functional.pad(table, (0, 7 - len(table)), value=-1))
        qs.append(q)
    out = paged_attention(torch.cat(qs), pool, layout, torch.stack(tables),
                          torch.tensor(lens, dtype=torch.int32),
                          torch.tensor(qlens, dtype=torch.int32))
    torch.testing.assert_close(out.double(), torch.cat(refs).double(), rtol=0, atol=2e-4)


def test_attention_rejects_mismatched_shapes():
    layout = PageLayout(KVPolicy.parse("int4"), 64, 2, 16)
    pool = new_pool(layout, 1, 4)[0]
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(torch.randn(1, 4, 128), pool, layout, bt, torch.tensor([1]))
    with pytest.raises(ValueError, match="group"):
        paged_attention(torch.randn(1, 3, 64), pool, layout, bt, torch.tensor([1]))
    with pytest.raises(ValueError, match="new tokens"):
        paged_attention(torch.randn(3, 4, 64), pool, layout, bt, torch.tensor([2]),
                        torch.tensor([3]))


def test_paged_cache_object():
    cache = PagedKVCache(PageLayout(KVPolicy.parse("int4-bdr"), 128, 8, 64), 36, 10)
    assert cache.pool.shape == (36, 10, 8, 64 * 136)
    assert cache.layer(3).data_ptr() == cache.pool[3].data_ptr()
    with pytest.raises(KVPoolExhausted):
        cache.allocator.allocate(11)


def test_mixed_pool_is_per_layer_and_each_layer_stores_like_its_own_policy():
    """A policy with per-layer pages gets one tensor per layer, each as wide as its layer's
    format; writing through layer i's layout is exactly a uniform pool of that layer's policy."""
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32,kv,seed=2,int8=2,bf16=0"), 64, 3, 16)
    cache = PagedKVCache(layout, 4, 12)
    widths = [t.shape for t in cache.pool]
    assert widths == [(12, 3, 16 * 2 * (2 * 64)), (12, 3, 16 * 2 * (32 + 4)),
                      (12, 3, 16 * 2 * (64 + 4)), (12, 3, 16 * 2 * (32 + 4))]
    assert kv_cache.pool_pages(cache.pool) == 12
    assert kv_cache.pool_nbytes(cache.pool) == 12 * layout.pool_page_bytes(4)
    assert kv_cache.pool_pages(new_pool(layout.for_layer(1), 4, 7)) == 7
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(21, 3, 64, generator=gen), torch.randn(21, 3, 64, generator=gen)
    slots = torch.randperm(12 * 16, generator=gen)[:21]
    for i in range(4):
        lay = cache.layer_layout(i)
        assert lay.policy == KVPolicy.parse({0: "bf16", 2: "int8"}.get(i, "int4-bdr:h=32,kv,seed=2"))
        write_kv(cache.layer(i), lay, k, v, slots)
        alone = new_pool(lay, 1, 12)[0]
        write_kv(alone, lay, k, v, slots)
        assert torch.equal(cache.layer(i), alone)


def test_query_operand_models_the_prefill_kernel_rounding():
    """query_operand=fp16 rounds the rotated query once (clamped to fp16's range, so a huge
    query gives finite scores), and moves the output far less than INT4 itself does."""
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32"), 64, 1, 16)
    q = torch.randn(5, 2, 64) * 3
    q[0, 0, 0] = 1e6
    exact = reference.rotate_query(q, layout)
    rounded = reference.rotate_query(q, layout, torch.float16)
    assert torch.isfinite(rounded).all() and rounded.abs().max() <= reference.FP16_MAX
    small = exact.abs() < 1e3
    assert torch.equal(rounded[small], exact[small].half().float())
    assert not torch.equal(rounded, exact)
    pool = kv_cache.new_pool(layout, 1, 2)[0]
    k, v = torch.randn(20, 1, 64), torch.randn(20, 1, 64)
    k[:, :, 3] *= 50
    kv_cache.write_kv(pool, layout, k, v, torch.arange(20))
    args = (pool, layout, torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([20]),
            torch.tensor([5]))
    q = torch.randn(5, 2, 64)
    a = reference.paged_attention(q, *args)
    b = reference.paged_attention(q, *args, query_operand=torch.float16)
    exact_kv = reference.dense_attention(q, k, v, 15, 1 / 8)
    assert (a - b).norm() < 0.01 * (a - exact_kv).norm()
