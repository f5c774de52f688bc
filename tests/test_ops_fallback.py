"""CPU fallback of the kernel ops: ops.attention_step (and its torch custom op) equals the
reference write + reference attention, and step_slots places each new token right."""
from __future__ import annotations

import torch

from sawtrt import kv_cache, reference
from sawtrt.kernels import ops
from sawtrt.spec import KVPolicy, PageLayout


def test_attention_step_cpu_fallback_matches_reference():
    gen = torch.Generator().manual_seed(3)
    d, hkv, hq, page = 64, 2, 4, 16
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32,kv,seed=2"), d, hkv, page)
    seq_lens, q_lens = [21, 40], [21, 6]
    tables = torch.tensor([[3, 0, 9], [5, 1, 7]], dtype=torch.int32)
    pool = kv_cache.new_pool(layout, 1, 10)[0]
    # cached prefix of sequence 1 (positions 0..33)
    pos = torch.arange(34)
    slots = tables[1, pos // page].long() * page + pos % page
    kv_cache.write_kv(pool, layout, torch.randn(34, hkv, d, generator=gen),
                      torch.randn(34, hkv, d, generator=gen), slots)
    ref_pool = pool.clone()
    n = sum(q_lens)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen)
    cu = torch.tensor([0, 21, 27], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.ops.sawtrt.attention_step(qkv, pool, tables, lens, cu, layout.to_json(), hq, 21,
                                          40, 0.125)
    new_slots = ops.step_slots(layout, tables, lens, cu, n)
    expect = torch.cat([tables[0, torch.arange(21) // page].long() * page + torch.arange(21) % page,
                        tables[1, torch.arange(34, 40) // page].long() * page
                        + torch.arange(34, 40) % page])
    assert torch.equal(new_slots, expect)
    kv_cache.write_kv(ref_pool, layout, qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d),
                      qkv[:, (hq + hkv) * d:].reshape(n, hkv, d), new_slots)
    assert torch.equal(pool, ref_pool)
    ref = reference.paged_attention(qkv[:, :hq * d].reshape(n, hq, d), ref_pool, layout, tables,
                                    lens, torch.tensor(q_lens), 0.125)
    torch.testing.assert_close(out, ref.reshape(n, hq * d), rtol=0, atol=0)


def test_libraries_without_the_decode_probe_get_no_int8_fused_step():
    """A library built before int8 decode has no saw_decode_supported and returned
    SAW_ERR_UNSUPPORTED for int8 decode: the runtime must then keep int8 layers off the fused
    step (it has no fallback) and take write_kv + paged_attention instead."""
    from types import SimpleNamespace

    from sawtrt.kernels import library
    old = SimpleNamespace()                                   # no saw_decode_supported
    for kind, served in (("int8", False), ("int4-bdr", True), ("bf16", True)):
        cfg = library.make_config(PageLayout(KVPolicy.parse(kind), 128, 8), 32, torch.bfloat16)
        assert library.decode_supported(cfg, old) is served
    probe = SimpleNamespace(saw_decode_supported=lambda cfg: 1)
    cfg = library.make_config(PageLayout(KVPolicy("int8"), 128, 8), 32, torch.bfloat16)
    assert library.decode_supported(cfg, probe) is True


def test_linear_cpu_is_cublas_path_and_op_matches():
    """sawtrt.kernels.linear on CPU: never routed to saw_linear, equal to F.linear bit for bit;
    the sawtrt::linear op (what compiled CUDA graphs call) gives the same values on any device
    it is handed, with and without a bias."""
    import torch.nn.functional as F

    from sawtrt.kernels import linear as lin
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(37, 24, generator=gen)
    b = torch.randn(37, generator=gen)
    for m in (1, 2, 9):
        x = torch.randn(m, 24, generator=gen)
        assert not lin.kernel_serves(x, w, b, max_rows=8)
        assert torch.equal(lin.linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(lin.linear(x, w), F.linear(x, w))
        if lin.CUSTOM_OP_REGISTERED:
            assert torch.equal(torch.ops.sawtrt.linear(x, w, b), F.linear(x, w, b))
