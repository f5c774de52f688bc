"""CPU fallback of the kernel ops: ops.attention_step (and its torch custom op) equals the
reference write + reference attention, and step_slots places each new token right."""
from __future__ import annotations

import pytest
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
            assert torch.equal(torch.ops.sawtrt.linear(x, w, b, None, 0.0, None, False),
                               F.linear(x, w, b))


def test_linear_fusions_cpu_are_the_layer_ops():
    """linear(norm_weight=, residual=) and linear_glu(residual=) on CPU are the ops a decoder
    layer runs around its GEMMs (RMSNorm before, SiLU * up before, residual add after), bit for
    bit; so is the sawtrt::linear op."""
    import torch.nn.functional as F

    from sawtrt.kernels import linear as lin
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(40, 32, generator=gen).bfloat16()
    g = torch.rand(32, generator=gen).bfloat16()
    for m in (1, 3):
        x = torch.randn(m, 32, generator=gen).bfloat16()
        gu = torch.randn(m, 64, generator=gen).bfloat16()
        r = torch.randn(m, 40, generator=gen).bfloat16()
        want = r + F.linear(lin.rms_norm(x, g, 1e-5), w)
        assert torch.equal(lin.linear(x, w, norm_weight=g, eps=1e-5, residual=r), want)
        assert torch.equal(lin.linear(x, w, norm_weight=g, eps=1e-5),
                           F.linear(lin.rms_norm(x, g, 1e-5), w))
        gate, up = gu.chunk(2, -1)
        assert torch.equal(lin.linear_glu(gu, w, residual=r), r + F.linear(F.silu(gate) * up, w))
        if lin.CUSTOM_OP_REGISTERED:
            assert torch.equal(torch.ops.sawtrt.linear(x, w, None, g, 1e-5, r, False), want)


def test_qk_prologue_is_the_model_prologue():
    """ops.QKPrologue.apply_ (what the write kernel is tested against) computes the model's
    q/k-norm + RoPE: attn_in with the prologue left out, then apply_, equals attn_in in fp32;
    and attention_step with a prologue on the CPU applies it before the write."""
    from sawtrt.models.model import Rope, attn_in
    gen = torch.Generator().manual_seed(9)
    d, hkv, hq, hidden, t = 64, 2, 4, 96, 5
    x = torch.randn(t, hidden, generator=gen)
    in_norm = 1 + 0.1 * torch.randn(hidden, generator=gen)
    qkv_w = torch.randn((hq + 2 * hkv) * d, hidden, generator=gen) * hidden ** -0.5
    q_norm, k_norm = (1 + 0.3 * torch.randn(d, generator=gen) for _ in range(2))
    cos, sin = Rope(d, 1e6, 64).tables(torch.tensor([0, 3, 17, 40, 63]), torch.float32)
    args = (x, in_norm, qkv_w, None, q_norm, k_norm, cos, sin, None, 1e-6, hq, hkv, d)
    want = attn_in(*args)
    raw = attn_in(*args, True)
    assert raw.shape == want.shape and not torch.allclose(raw, want)
    pro = ops.QKPrologue(q_norm, k_norm, 1e-6, cos, sin)
    got = raw.clone()
    pro.apply_(got, hq, hkv, d)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32"), d, hkv, 16)
    tables = torch.tensor([[0], [1], [2], [3], [4]], dtype=torch.int32)
    lens, cu = torch.ones(t, dtype=torch.int32), torch.arange(t + 1, dtype=torch.int32)
    pools = [kv_cache.new_pool(layout, 1, 5)[0] for _ in range(2)]
    a, b = raw.clone(), got.clone()
    out_a = ops.attention_step(a, pools[0], layout, hq, tables, lens, cu, 1, 1, prologue=pro)
    out_b = ops.attention_step(b, pools[1], layout, hq, tables, lens, cu, 1, 1)
    assert torch.equal(a, b) and torch.equal(pools[0], pools[1]) and torch.equal(out_a, out_b)


def test_qk_prologue_struct_takes_only_what_the_kernel_reads():
    """QKPrologue.struct: the C view for [D] weights and [T, D] rows of qkv's dtype; None (the
    torch path) for anything the kernel would read wrongly."""
    t, d, dt = 3, 64, torch.bfloat16
    qkv = torch.zeros(t, 8 * d, dtype=dt)
    w = torch.ones(d, dtype=dt)
    cs = torch.ones(t, 2 * d, dtype=dt)[:, :d]          # rows with a stride of 2 D
    pro = ops.QKPrologue(w, w, 1e-6, cs, cs).struct(qkv, d)
    assert pro.q_norm == w.data_ptr() and pro.rope_cos == cs.data_ptr()
    assert pro.rope_stride == 2 * d and abs(pro.norm_eps - 1e-6) < 1e-12
    assert ops.QKPrologue(None, None, 0.0, None, None).struct(qkv, d).rope_cos is None
    for bad in (dict(q_norm=torch.ones(d + 1, dtype=dt)), dict(cos=cs.float()),
                dict(sin=torch.ones(t + 1, d, dtype=dt)), dict(k_norm=torch.ones(d)),
                dict(cos=torch.ones(1, d, dtype=dt).expand(t, d),
                     sin=torch.ones(1, d, dtype=dt).expand(t, d))):   # row stride 0
        kw = dict(q_norm=w, k_norm=w, eps=1e-6, cos=cs, sin=cs) | bad
        assert ops.QKPrologue(**kw).struct(qkv, d) is None, bad
    with pytest.raises(ValueError, match="both cos and sin"):
        ops.QKPrologue(w, w, 1e-6, cs, None)
