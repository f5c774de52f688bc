"""The attention step's q/k prologue (saw_attention_step_qk: q/k RMSNorm + RoPE in the write
kernel) against the same prologue in torch (ops.QKPrologue.apply_) followed by the plain step.

* q and k written back into qkv: within two roundings of the torch prologue. Both compute in
  fp32 and round where c_api.h says; rsqrt and the sum order may move the normalized value
  across a rounding boundary, and the weight, the second rounding and RoPE's sum carry that
  step on: |kernel - torch| <= 2 ulp of the head vector's largest element, on at most 1 % of
  the elements. V untouched, bit for bit.
* the pool: byte-identical to the reference write (CPU kv_cache.write_kv) of the kernel's own
  written-back k and v, so the prologue's values are exactly what was quantized.
* the output: the reference attention over that pool with the written-back q (tolerance of
  tests/test_kernels_gpu.py).
Inputs: fresh random data with outlier channels in k (q plain, as the decode kernel's tolerance
in tests/test_kernels_gpu.py assumes: an un-normalized outlier query times an outlier key gives
logits whose fp16 rounding alone exceeds it), norm weights around 1, the RoPE
tables of each token's real position; lengths that are not tile or page multiples; NaN-poisoned
outputs; pages in random order. Also: no norm (Llama), no RoPE, and a captured CUDA graph.
"""
from __future__ import annotations

import pytest
import torch

from sawtrt import kv_cache, reference
from sawtrt.kernels import library, ops
from sawtrt.models.model import Rope
from sawtrt.spec import KVPolicy, PageLayout

from test_kernels_gpu import DEV, DTYPES, _gen, build_batch, check_close, outlier_heads

pytestmark = pytest.mark.gpu

_LIB = library.try_load()
if not torch.cuda.is_available() or _LIB is None or not hasattr(_LIB, "saw_attention_step_qk"):
    pytest.skip("needs a CUDA GPU and libsawtrt_kernels.so with saw_attention_step_qk",
                allow_module_level=True)

_ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}   # spacing relative to |x|


def _step(policy, d, dt, decode, group=4, hkv=2, page=32, seed=0):
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    hq = hkv * group
    gen = _gen(1000 + seed)
    seq_lens = [1, 54, 97, 200, 9] if decode else [54, 97, 1, 200, 9]
    q_lens = [1] * 5 if decode else [54, 40, 1, 7, 9]
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=False)
    n = sum(q_lens)
    q = torch.randn(n, hq, d, generator=gen)
    k = outlier_heads(n, hkv, d, gen, 2.0)
    v = torch.randn(n, hkv, d, generator=gen) * 2
    raw = torch.cat([q, k, v], 1).reshape(n, -1).to(dt).to(DEV)
    pos = torch.cat([torch.arange(s - ql, s) for s, ql in zip(seq_lens, q_lens)])
    cos, sin = Rope(d, 1e6, 512, DEV).tables(pos.to(DEV), dt)
    q_norm = (1 + 0.3 * torch.randn(d, generator=gen)).to(dt).to(DEV)
    k_norm = (1 + 0.3 * torch.randn(d, generator=gen)).to(dt).to(DEV)
    meta = dict(block_tables=tables.to(DEV),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
                cu_q_lens=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(),
                                       dtype=torch.int32, device=DEV),
                max_q_len=max(q_lens), max_seq_len=max(seq_lens))
    return layout, hq, pool, raw, (q_norm, k_norm, cos, sin), meta, q_lens


def _run(layout, hq, pool, qkv, meta, prologue):
    out = torch.full((qkv.shape[0], hq * layout.head_dim), float("nan"), dtype=qkv.dtype,
                     device=DEV)
    ops.attention_step(qkv, pool, layout, hq, meta["block_tables"], meta["seq_lens"],
                       meta["cu_q_lens"], meta["max_q_len"], meta["max_seq_len"], out=out,
                       prologue=prologue)
    return out


@pytest.mark.parametrize("parts", ["norm+rope", "rope", "norm"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d, policy", [(128, "int4-bdr"), (128, "int4-bdr:h=64,kv,seed=11"),
                                       (64, "int4"), (256, "int4-bdr:h=128"), (128, "int8"),
                                       (128, "bf16")])
@pytest.mark.parametrize("decode", [True, False])
def test_prologue_in_the_write_kernel(decode, d, policy, dtype, parts):
    dt = DTYPES[dtype]
    layout, hq, pool, raw, (qn, kn, cos, sin), meta, q_lens = _step(
        policy, d, dt, decode, seed=d + len(policy) + 7 * decode)
    hkv = layout.num_kv_heads
    pro = ops.QKPrologue(qn if "norm" in parts else None, kn if "norm" in parts else None,
                         1e-6, cos if "rope" in parts else None, sin if "rope" in parts else None)
    assert pro.struct(raw, d) is not None and ops.prologue_supported(DEV) \
        and ops.kernel_config(layout, hq, dt, DEV) is not None, \
        "the kernel must take this prologue, not torch"
    ref_pool = pool.clone()
    qkv = raw.clone()
    out = _run(layout, hq, pool, qkv, meta, pro)
    want = raw.clone()
    pro.apply_(want, hq, hkv, d)
    torch.cuda.synchronize()

    qk = (hq + hkv) * d
    assert torch.equal(qkv[:, qk:], raw[:, qk:]), "V columns changed"
    n = qkv.shape[0]
    a = qkv[:, :qk].float().view(n, hq + hkv, d)
    b = want[:, :qk].float().view(n, hq + hkv, d)
    diff = (a - b).abs()
    ulp = _ULP[dt] * b.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -14)
    assert (diff <= 2 * ulp).all(), f"prologue off by {(diff / ulp).max():.2f} ulp of a row max"
    assert (diff > 0).float().mean() <= 0.01, \
        f"{(diff > 0).float().mean():.2%} of q/k values differ (> 1 %)"

    slots = ops.step_slots(layout, meta["block_tables"], meta["seq_lens"].cpu(),
                           meta["cu_q_lens"].cpu(), n)
    k = qkv[:, hq * d:qk].reshape(n, hkv, d).cpu()
    v = qkv[:, qk:].reshape(n, hkv, d).cpu()
    ref_pool = ref_pool.cpu()
    kv_cache.write_kv(ref_pool, layout, k, v, slots.cpu())
    assert torch.equal(pool.cpu(), ref_pool), "the pool is not the write of the prologue's k"
    ref = reference.paged_attention(qkv[:, :hq * d].reshape(n, hq, d).float(), pool, layout,
                                    meta["block_tables"], meta["seq_lens"].cpu(),
                                    torch.tensor(q_lens), None,
                                    query_operand=reference.kernel_query_operand(q_lens))
    check_close(out.reshape(n, hq, d), ref, dt, f"prologue {policy} decode={decode}",
                unit=torch.bfloat16 if decode else None)


def test_prologue_falls_back_to_torch():
    """A prologue the kernel cannot take (fp32 cos rows) runs in torch, with the same result
    as QKPrologue.apply_ followed by the plain step."""
    dt = torch.bfloat16
    layout, hq, pool, raw, (qn, kn, cos, sin), meta, _ = _step("int4-bdr", 128, dt, True)
    pro = ops.QKPrologue(qn, kn, 1e-6, cos.float(), sin.float())
    assert pro.struct(raw, 128) is None
    pool2 = pool.clone()
    a = raw.clone()
    out_a = _run(layout, hq, pool, a, meta, pro)
    b = raw.clone()
    pro.apply_(b, hq, layout.num_kv_heads, 128)
    out_b = _run(layout, hq, pool2, b, meta, None)
    torch.cuda.synchronize()
    assert torch.equal(a, b) and torch.equal(pool, pool2) and torch.equal(out_a, out_b)


def test_prologue_under_cuda_graph():
    """The decode step with its prologue captured and replayed on new projections: equal to a
    direct call bit for bit (the write kernel reads no host state)."""
    dt = torch.bfloat16
    layout, hq, pool, raw, (qn, kn, cos, sin), meta, _ = _step("int4-bdr", 128, dt, True)
    pro = ops.QKPrologue(qn, kn, 1e-6, cos, sin)
    static = raw.clone()
    pool_g = pool.clone()
    _run(layout, hq, pool_g, static.clone(), meta, pro)     # allocates the workspace
    out = torch.empty(raw.shape[0], hq * 128, dtype=dt, device=DEV)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.attention_step(static, pool_g, layout, hq, meta["block_tables"], meta["seq_lens"],
                           meta["cu_q_lens"], meta["max_q_len"], meta["max_seq_len"], out=out,
                           prologue=pro)
    fresh = torch.randn(raw.shape, generator=_gen(5)).to(dt).to(DEV)
    static.copy_(fresh)
    g.replay()
    direct_qkv = fresh.clone()
    direct = _run(layout, hq, pool, direct_qkv, meta, pro)
    torch.cuda.synchronize()
    assert torch.equal(out, direct) and torch.equal(static, direct_qkv)
    assert torch.equal(pool_g, pool)
