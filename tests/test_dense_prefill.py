"""The fresh-K/V prefill semantics on the CPU: the step plan, the reference
(reference.fresh_prefill_attention) against independent computations, the CPU path of
ops.attention_step(plan=...) and the model's two semantics (kernels: test_dense_prefill_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from sawtrt import hadamard, kv_cache, reference
from sawtrt.kernels import dense_prefill, ops
from sawtrt.spec import KVPolicy, PageLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def _outlier(n, heads, d, gen):
    x = torch.randn(n, heads, d, generator=gen)
    x[..., :3] *= 30
    return x


def _pool_with_prefix(layout, seq_lens, q_lens, gen):
    """Pool whose sequences hold their prefixes (seq_len - q_len tokens), pages shuffled."""
    page = layout.page_size
    npages = [-(-n // page) for n in seq_lens]
    perm = torch.randperm(sum(npages) + 1, generator=gen)
    tables = torch.zeros(len(seq_lens), max(npages), dtype=torch.int32)
    at = 0
    for b, n in enumerate(npages):
        tables[b, :n] = perm[at:at + n].int()
        at += n
    pool = kv_cache.new_pool(layout, 1, sum(npages) + 1)[0]
    for b, (s, n) in enumerate(zip(seq_lens, q_lens)):
        pos = torch.arange(s - n)
        slots = tables[b, pos // page].long() * page + pos % page
        kv_cache.write_kv(pool, layout, _outlier(s - n, layout.num_kv_heads, layout.head_dim, gen),
                          torch.randn(s - n, layout.num_kv_heads, layout.head_dim, generator=gen),
                          slots)
    return pool, tables


def _slots(layout, tables, seq_lens, q_lens):
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return ops.step_slots(layout, tables, torch.tensor(seq_lens), cu, sum(q_lens))


def test_plan_splits_dense_and_decode_rows():
    plan = dense_prefill.PrefillPlan.build([3, 1, 5, 1, 2], [10, 7, 5, 4, 9], list(range(12)))
    assert plan.dense_seqs.tolist() == [0, 2, 4]
    assert plan.dense_rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]
    assert plan.decode_seqs.tolist() == [1, 3] and plan.decode_rows.tolist() == [3, 9]
    assert plan.prefix_lens.tolist() == [7, 0, 7]
    assert plan.cu_q.tolist() == [0, 3, 8, 10] and plan.cu_k.tolist() == [0, 10, 15, 24]
    assert plan.cu_prefix.tolist() == [0, 7, 7, 14]
    assert plan.new_rows.tolist() == [7, 8, 9, 10, 11, 12, 13, 14, 22, 23]
    assert (plan.max_q, plan.max_k, plan.max_prefix, plan.total_k) == (5, 10, 7, 24)
    assert plan.shape is None
    every = dense_prefill.PrefillPlan.build([4, 4], [4, 4], list(range(8)))
    assert every.dense_rows is None and every.decode_seqs is None and every.shape == (2, 4, 0)
    assert dense_prefill.PrefillPlan.build([1, 1], [5, 9], [0, 1]) is None
    with pytest.raises(ValueError, match="new tokens"):
        dense_prefill.PrefillPlan.build([6], [5], list(range(6)))


def test_backend_choice_by_step_shape():
    """auto: cuDNN for uniform steps (the split with a prefix), cuDNN per sequence for a few
    ragged ones (a serving step: a prompt's tail chunk + the next prompt), flash for many."""
    plan = dense_prefill.PrefillPlan.build
    ragged = plan([3, 1, 5, 1, 2], [10, 7, 5, 4, 9], list(range(12)))
    assert ragged.dense_lens() == [(3, 7), (5, 0), (2, 7)]
    assert dense_prefill.choose_backend(ragged) == "cudnn-seq"
    n = dense_prefill.SEQ_CALLS_MAX + 1
    many = plan([2 + i for i in range(n)], [9 + i for i in range(n)], list(range(99)))
    assert dense_prefill.choose_backend(many) == "flash"
    assert dense_prefill.choose_backend(plan([4, 4], [4, 4], list(range(8)))) == "cudnn"
    assert dense_prefill.choose_backend(plan([4, 4], [9, 9], list(range(8)))) == "cudnn-split"
    assert dense_prefill.choose_backend(ragged, "flash") == "flash"
    with pytest.raises(ValueError, match="one of"):
        dense_prefill.choose_backend(ragged, "fa3")


@pytest.mark.parametrize("policy", ["int4-bdr:h=16,kv,seed=3", "int4", "int8", "bf16"])
def test_fresh_reference_matches_rotated_basis(policy):
    """The reference un-rotates the cached prefix; computing in the cache's rotated basis
    instead (rotate q and the fresh k, inverse-rotate the output when V is rotated) must give
    the same numbers: q.k = (qR).(kR)."""
    gen = torch.Generator().manual_seed(7)
    d, hkv, hq = 32, 2, 6
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, 16)
    seq_lens, q_lens = [37, 9, 51], [5, 1, 51]
    pool, tables = _pool_with_prefix(layout, seq_lens, q_lens, gen)
    n = sum(q_lens)
    q, k, v = torch.randn(n, hq, d, generator=gen), _outlier(n, hkv, d, gen), \
        torch.randn(n, hkv, d, generator=gen)
    kv_cache.write_kv(pool, layout, k, v, _slots(layout, tables, seq_lens, q_lens))
    got = reference.fresh_prefill_attention(q, k, v, pool, layout, tables,
                                            torch.tensor(seq_lens), q_lens)
    p = layout.policy
    rot = (lambda x: hadamard.rotate(x, p.rotation_block, p.signs(d))) if p.rotated else \
        (lambda x: x.float())
    start = 0
    for b, (s, m) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(start, start + m)
        kc, vc = kv_cache.gather_kv(pool, layout, tables[b], s)   # rotated basis, quantized
        if m >= 2:   # fresh: own tokens unquantized, in the rotated basis
            kc = torch.cat((kc[:s - m], rot(k[rows])))
            vc = torch.cat((vc[:s - m], rot(v[rows]) if p.rotate_v else v[rows]))
        want = reference.dense_attention(rot(q[rows]), kc, vc, s - m, d ** -0.5)
        want = reference.unrotate_output(want, layout)
        torch.testing.assert_close(got[rows], want, rtol=1e-4, atol=1e-4)
        start += m


def test_fresh_differs_from_cache_only_for_prompt_rows():
    gen = torch.Generator().manual_seed(8)
    d, hkv, hq = 32, 2, 4
    layout = PageLayout(KVPolicy.parse("int4-bdr"), d, hkv, 16)
    seq_lens, q_lens = [40, 20], [12, 1]
    pool, tables = _pool_with_prefix(layout, seq_lens, q_lens, gen)
    q, k, v = torch.randn(13, hq, d, generator=gen), _outlier(13, hkv, d, gen), \
        torch.randn(13, hkv, d, generator=gen)
    kv_cache.write_kv(pool, layout, k, v, _slots(layout, tables, seq_lens, q_lens))
    fresh = reference.fresh_prefill_attention(q, k, v, pool, layout, tables,
                                              torch.tensor(seq_lens), q_lens)
    cache = reference.paged_attention(q, pool, layout, tables, torch.tensor(seq_lens),
                                      torch.tensor(q_lens))
    assert torch.equal(fresh[12], cache[12])                     # the decode row: the cache
    assert (fresh[1:12] - cache[1:12]).abs().max() > 1e-3        # own K/V unquantized
    # the first new token's own K is fresh, the rest of its context is the same prefix
    assert (fresh[:12] - cache[:12]).norm() / cache[:12].norm() < 0.5


def test_attention_step_plan_on_cpu_writes_and_attends():
    gen = torch.Generator().manual_seed(9)
    d, hkv, hq = 64, 1, 4
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32,kv"), d, hkv, 32)
    seq_lens, q_lens = [70, 33, 8], [30, 1, 8]
    pool, tables = _pool_with_prefix(layout, seq_lens, q_lens, gen)
    ref_pool = pool.clone()
    n = sum(q_lens)
    q, k, v = torch.randn(n, hq, d, generator=gen), _outlier(n, hkv, d, gen), \
        torch.randn(n, hkv, d, generator=gen)
    slots = _slots(layout, tables, seq_lens, q_lens)
    plan = dense_prefill.PrefillPlan.build(q_lens, seq_lens, slots)
    qkv = torch.cat((q, k, v), 1).reshape(n, -1)
    cu = torch.tensor([0, 30, 31, 39], dtype=torch.int32)
    out = ops.attention_step(qkv, pool, layout, hq, tables, torch.tensor(seq_lens), cu, 30,
                             plan=plan)
    kv_cache.write_kv(ref_pool, layout, k, v, slots)
    assert torch.equal(pool, ref_pool)
    want = reference.fresh_prefill_attention(q, k, v, ref_pool, layout, tables,
                                             torch.tensor(seq_lens), q_lens)
    torch.testing.assert_close(out, want.reshape(n, -1))


def test_model_semantics_switch(tmp_path):
    """CausalLM: the switch changes what prompt tokens read; a chunked fresh prefill gives the
    last chunk's logits of a one-shot fresh prefill up to the quantization of the first chunk
    (which the second reads from INT4 pages)."""
    from runtime_helpers import tiny_spec
    from sawtrt.models.model import AttentionMetadata, CausalLM
    from sawtrt.models.weights import random_weights
    spec = tiny_spec("qwen3")
    w = random_weights(spec, seed=1, dtype=torch.float32)
    ids = torch.randint(0, spec.vocab_size, (40,), generator=torch.Generator().manual_seed(2))

    def run(policy, mode, chunks):
        layout = PageLayout(KVPolicy.parse(policy), spec.head_dim, spec.num_kv_heads, 16)
        m = CausalLM(spec, layout, w, dtype=torch.float32, device="cpu", prefill_kv=mode)
        pool = kv_cache.new_pool(layout, spec.num_layers, 4)
        table = torch.arange(4, dtype=torch.int32)
        start, logits = 0, None
        for n in chunks:
            pos = torch.arange(start, start + n)
            meta = AttentionMetadata(pos, table[pos // 16].long() * 16 + pos % 16, table[None],
                                     torch.tensor([start + n], dtype=torch.int32),
                                     torch.tensor([n], dtype=torch.int32), torch.arange(n),
                                     is_decode=n == 1)
            logits = m(ids[start:start + n], meta, pool)
            start += n
        return logits

    with pytest.raises(ValueError, match="prefill_kv"):
        run("int4", "bogus", [40])
    cache, fresh = run("int4-bdr", "cache", [40]), run("int4-bdr", "fresh", [40])
    assert (cache - fresh).abs().max() > 1e-4            # the switch changes what is read
    one = run("int4-bdr", "fresh", [40])[-10:]
    chunked = run("int4-bdr", "fresh", [30, 10])
    rel = ((one - chunked).norm() / one.norm()).item()
    assert 0 < rel < 0.2, rel      # chunk 2 reads chunk 1 from INT4 pages, the one-shot fresh
