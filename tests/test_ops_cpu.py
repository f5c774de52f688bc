"""sawtrt.kernels.cpu (the CPU path of write_kv / paged_attention) against the reference: the
same pool bytes and bit-identical attention outputs."""
from __future__ import annotations

import pytest
import torch

from sawtrt import kv_cache, reference
from sawtrt.kernels import cpu, ops
from sawtrt.spec import KVPolicy, PageLayout

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

POLICIES = ["int4-bdr", "int4-bdr:h=32,kv,seed=3", "int4", "int8", "bf16"]


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("policy", POLICIES)
def test_cpu_ops_equal_reference(policy, page_size):
    g = torch.Generator().manual_seed(7)
    lay = PageLayout(KVPolicy.parse(policy).resolve(64), 64, 3, page_size)
    ref = kv_cache.new_pool(lay, 1, 20, poison=0xAB)[0]
    mine = ref.clone()
    t = 97                                     # two sequences, partial last pages, a padding slot
    k = torch.randn(t, 3, 64, generator=g) * 3
    v = torch.randn(t, 3, 64, generator=g)
    k[5, 1, 7] = float("nan")
    k[9, 0, :4] *= 50                          # outliers
    ps = page_size
    slots = torch.cat([torch.arange(ps * 3 + 5, ps * 3 + 55), torch.tensor([-1]),
                       torch.arange(ps * 9, ps * 9 + 46)])
    kv_cache.write_kv(ref, lay, k, v, slots)
    cpu.write_kv(mine, lay, k, v, slots)
    assert torch.equal(ref, mine)
    tables = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [9, 10, 11, 12, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([55, 46], dtype=torch.int32)
    for q_lens in (None, torch.tensor([7, 46]), torch.tensor([1, 3])):
        n = 2 if q_lens is None else int(q_lens.sum())
        q = torch.randn(n, 9, 64, generator=g)
        want = reference.paged_attention(q, ref, lay, tables, lens, q_lens)
        assert torch.equal(cpu.paged_attention(q, mine, lay, tables, lens, q_lens), want)
        assert torch.equal(ops.paged_attention(q, mine, lay, tables, lens, q_lens), want)


def test_cpu_write_one_token_per_sequence():
    lay = PageLayout(KVPolicy.parse("int4-bdr").resolve(64), 64, 3, 16)
    ref = kv_cache.new_pool(lay, 1, 8, poison=0x5A)[0]
    mine = ref.clone()
    k, v = torch.randn(3, 3, 64), torch.randn(3, 3, 64)
    slots = torch.tensor([16 * 5 + 15, 16 * 2, 16 * 5 + 14])   # out of order, same page
    kv_cache.write_kv(ref, lay, k, v, slots)
    ops.write_kv(mine, lay, k, v, slots)
    assert torch.equal(ref, mine)


def _half_bits_step_by_bits(h: torch.Tensor, up: bool) -> torch.Tensor:
    """fp16 neighbour towards +-inf computed on the bit pattern (an independent oracle)."""
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    neg, mag = bits >= 0x8000, bits & 0x7FFF
    grow = neg != up
    mag = torch.where(grow, mag + 1, torch.where(mag == 0, torch.ones_like(mag), mag - 1))
    sign = torch.where(grow, neg, torch.where(mag == 0, torch.zeros_like(neg), neg))
    sign = torch.where((bits & 0x7FFF) == 0, torch.full_like(neg, not up), sign)
    out = torch.where(sign, mag | 0x8000, mag)
    out = torch.where(out >= 0x8000, out - 0x10000, out)
    return out.to(torch.int16).view(torch.float16)


@pytest.mark.parametrize("up", [True, False])
def test_fp16_step_every_half(up):
    from sawtrt import quant
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[torch.isfinite(h) & (h.float().abs() < 65504)]
    assert torch.equal(quant._half_bits_step(h, up).view(torch.int16),
                       _half_bits_step_by_bits(h, up).view(torch.int16))
