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
    """auto: cuDNN for uniform steps (the split with a prefix), flash varlen for ragged ones
    (cuDNN per sequence only when asked: it plans every new shape anew)."""
    plan = dense_prefill.PrefillPlan.build
    ragged = plan([3, 1, 5, 1, 2], [10, 7, 5, 4, 9], list(range(12)))
    assert ragged.dense_lens() == [(3, 7), (5, 0), (2, 7)]
    assert dense_prefill.choose_backend(ragged) == "flash"
    assert dense_prefill.choose_backend(ragged, "cudnn-seq") == "cudnn-seq"
    assert dense_prefill.choose_backend(plan([4, 4], [4, 4], list(range(8)))) == "cudnn"
    assert dense_prefill.choose_backend(plan([4, 4], [9, 9], list(range(8)))) == "cudnn-split"
    assert dense_prefill.choose_backend(ragged, "flash") == "flash"
    assert dense_prefill.choose_backend(ragged, "cudnn-bucket") == "flash"   # no fresh run
    with pytest.raises(ValueError, match="one of"):
        dense_prefill.choose_backend(ragged, "fa3")


def test_fresh_runs_and_the_rest(monkeypatch):
    """Prompt runs without a prefix and >= CUDNN_MIN_FRESH tokens go to padded cuDNN calls, by
    their rows among the dense rows; the other dense sequences keep a plan of their own."""
    monkeypatch.setattr(dense_prefill, "CUDNN_MIN_FRESH", 6)
    plan = dense_prefill.PrefillPlan.build
    step = plan([8, 1, 3, 9, 6], [8, 1, 12, 9, 6], list(range(27)))
    assert step.dense_lens() == [(8, 0), (3, 9), (9, 0), (6, 0)]
    assert step.fresh_runs == ((0, 8), (11, 9), (20, 6))
    assert step.rest_seqs.tolist() == [1] and step.rest_rows.tolist() == [8, 9, 10]
    rest = step.rest
    assert rest.dense_lens() == [(3, 9)] and rest.fresh_runs == () and rest.rest is None
    assert rest.dense_rows is None and rest.cu_k.tolist() == [0, 12] and rest.total_prefix == 9
    assert dense_prefill.choose_backend(step) == "cudnn-bucket"
    assert dense_prefill.choose_backend(step, "flash") == "flash"
    one = plan([40], [40], list(range(40)))           # one fresh prompt: padded, not exact
    assert one.fresh_runs == ((0, 40),) and one.rest is None
    assert dense_prefill.choose_backend(one) == "cudnn-bucket"
    short = plan([5], [5], list(range(5)))            # too short for cuDNN: flash
    assert short.fresh_runs == () and dense_prefill.choose_backend(short) == "flash"
    assert dense_prefill.choose_backend(plan([40, 40], [40, 40], list(range(80)))) == "cudnn"
    # a fresh run that cuDNN refused once goes to flash varlen from then on
    monkeypatch.setattr(dense_prefill, "_refused", {("cudnn-bucket", 64, torch.float16)})
    assert dense_prefill.choose_backend(step, key=(64, torch.float16)) == "flash"


def test_warm_up_runs_every_padded_length(monkeypatch):
    """One padded call per length a fresh run can take, CUDNN_MIN_FRESH .. the step budget;
    a shape cuDNN refuses is remembered and warm-up reports 0."""
    monkeypatch.setattr(dense_prefill, "CUDNN_MIN_FRESH", 100)
    monkeypatch.setattr(dense_prefill, "CUDNN_BUCKET", 128)
    lens = []

    def attend(q4, k4, v4, causal, scale):
        lens.append((q4.shape[2], k4.shape[1], k4.stride(2)))
        return torch.zeros_like(q4)
    monkeypatch.setattr(dense_prefill, "_sdpa_cudnn_4d", attend)
    assert dense_prefill.warm_up(8, 2, 16, torch.float32, "cpu", 600) == 10
    # per bucket the padded call (packed rows) and the unpadded one (views of qkv rows)
    assert lens == [(n, 2, s) for n in (128, 256, 384, 512, 640) for s in (2 * 16, 12 * 16)]
    assert dense_prefill.warm_up(8, 2, 16, torch.float32, "cpu", 99) == 0
    lens.clear()       # the smallest run fills its bucket: no padded call there
    monkeypatch.setattr(dense_prefill, "CUDNN_MIN_FRESH", 128)
    assert dense_prefill.warm_up(8, 2, 16, torch.float32, "cpu", 256) == 3
    assert lens == [(128, 2, 12 * 16), (256, 2, 2 * 16), (256, 2, 12 * 16)]

    def refuse(*args):
        raise RuntimeError("no plan")
    monkeypatch.setattr(dense_prefill, "_sdpa_cudnn_4d", refuse)
    monkeypatch.setattr(dense_prefill, "_refused", set())
    with pytest.warns(RuntimeWarning, match="refused the padded prefill"):
        assert dense_prefill.warm_up(8, 2, 16, torch.float32, "cpu", 600) == 0
    assert dense_prefill._refused == {("cudnn-bucket", 16, torch.float32)}


@pytest.mark.parametrize("n,bucket", [(1, 4), (13, 4), (16, 4), (37, 16), (48, 16)])
def test_bucketed_causal_is_exact(n, bucket):
    """Zero-padding a fresh run to a multiple of the bucket changes nothing in its rows: the
    causal mask keeps every real row off the padded keys (stand-in attention: fp32, causal; q
    and k have one length, so top-left and bottom-right alignment agree)."""
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, 4, 32, generator=gen)
    k, v = _outlier(n, 2, 32, gen), torch.randn(n, 2, 32, generator=gen)
    seen = []

    def attend(q4, k4, v4, causal, scale):
        assert causal and q4.shape[2] % bucket == 0 and q4.shape[2] - n < bucket
        assert (k4[:, :, n:] == 0).all() and (v4[:, :, n:] == 0).all()
        assert (q4.shape[2] == n) == (q4.data_ptr() == q.data_ptr())   # no padding: no copy
        seen.append(q4.shape[2])
        return _attend(q4, k4, v4, causal, scale)[0]

    got = dense_prefill.bucketed_causal(q, k, v, 0.2, attend, bucket)
    want = _attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                   True, 0.2)[0][0].transpose(0, 1)
    assert seen and got.shape == (n, 4, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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


# -- the GPU step's order and row bookkeeping, with PyTorch stand-ins for the kernels -----------
class _ReferenceKernels:
    """dense_prefill.StepKernels with the PyTorch reference behind each call. The page write is
    held back until join() (the side stream's latest finish), so a read of a new token's page
    before the join sees the pool's poison; gathered rows the call does not own are NaN, so a
    row the step never fills poisons what reads it."""

    def __init__(self, layout, hq):
        self.layout, self.hq, self.pending, self.calls = layout, hq, None, []

    def write(self, qkv, slots, pool):
        self.pending = (qkv.clone(), slots.clone(), pool)
        self.calls.append("write")

    def join(self):
        if self.pending is not None:
            qkv, slots, pool = self.pending
            hq, hkv, d = self.hq, self.layout.num_kv_heads, self.layout.head_dim
            t = qkv.shape[0]
            kv_cache.write_kv(pool, self.layout,
                              qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d),
                              qkv[:, (hq + hkv) * d:(hq + 2 * hkv) * d].reshape(t, hkv, d),
                              slots.long())
            self.pending = None
        self.calls.append("join")

    def decode(self, q, pool, tables, lens, max_len):
        assert self.pending is None, "decode rows read the pages before the write joined"
        assert max_len >= int(lens.max()), (max_len, lens.tolist())
        n, d = q.shape[0], self.layout.head_dim
        self.calls.append(("decode", n))
        o = reference.paged_attention(q[:, :self.hq * d].reshape(n, self.hq, d).float(), pool,
                                      self.layout, tables, lens, None)
        return o.reshape(n, -1).to(q.dtype)

    def gather(self, pool, tables, prefix_lens, row_starts, total_rows, max_prefix, dtype):
        hkv, d = self.layout.num_kv_heads, self.layout.head_dim
        assert max_prefix >= int(prefix_lens.max())
        k = torch.full((total_rows, hkv, d), float("nan"), dtype=dtype)
        v = torch.full_like(k, float("nan"))
        for b, (n, s) in enumerate(zip(prefix_lens.tolist(), row_starts.tolist())):
            kb, vb = reference.gather_kv_unrotated(pool, self.layout, tables[b], n)
            k[s:s + n], v[s:s + n] = kb.to(dtype), vb.to(dtype)
        self.calls.append("gather")
        return k, v


def _gqa_scores(q4, k4, scale):
    """[B, Hq, L, S] fp32 scores of q4 [B, Hq, L, D] over k4 [B, Hkv, S, D]."""
    k4 = k4.float().repeat_interleave(q4.shape[1] // k4.shape[1], dim=1)
    return torch.einsum("bhld,bhsd->bhls", q4.float(), k4) * scale


def _attend(q4, k4, v4, causal, scale):
    s = _gqa_scores(q4, k4, scale)
    if causal:   # bottom-right aligned
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
    v = v4.float().repeat_interleave(q4.shape[1] // v4.shape[1], dim=1)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _reference_backends(monkeypatch):
    """flash varlen / cuDNN stand-ins on the CPU (fp32 math, outputs in the input dtype)."""
    def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        out = torch.empty(q.shape, dtype=q.dtype)
        for i in range(cu_q.shape[0] - 1):
            a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            assert b - a <= max_q and e - c <= max_k
            o, _ = _attend(q[a:b].transpose(0, 1)[None], k[c:e].transpose(0, 1)[None],
                           v[c:e].transpose(0, 1)[None], True, scale)
            out[a:b] = o[0].transpose(0, 1).to(q.dtype)
        return out

    def cudnn_lse(q4, k4, v4, causal, scale):
        o, lse = _attend(q4, k4, v4, causal, scale)
        return o.to(q4.dtype), lse

    monkeypatch.setattr(dense_prefill, "flash_varlen", flash_varlen)
    monkeypatch.setattr(dense_prefill, "_cudnn_lse", cudnn_lse)
    monkeypatch.setattr(dense_prefill, "_sdpa_cudnn_4d",
                        lambda q4, k4, v4, causal, scale: cudnn_lse(q4, k4, v4, causal, scale)[0])


STEPS = [  # as tests/test_dense_prefill_gpu.py: mixed (decode rows, a one-token prompt
    ([54, 97, 1, 200, 130], [54, 33, 1, 1, 64]),   # sequence), ragged, one length, one prefix,
    ([17, 300, 5], [5, 129, 5]),                   # fresh runs around a chunk over a prefix
    ([77, 77], [77, 77]),
    ([300, 300], [45, 45]),
    ([70, 40, 1, 90], [70, 12, 1, 90]),
    ([64, 9], [64, 1]),                            # one fresh run + a decode row
]


@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn-split", "cudnn-seq",
                                     "cudnn-bucket"])
@pytest.mark.parametrize("policy,d,hkv,group,page,dtype", [
    ("int8", 64, 1, 16, 16, torch.float16),        # the H200 failure's configuration
    ("int4-bdr:h=32,kv,seed=5", 128, 2, 4, 32, torch.bfloat16),
])
def test_fused_step_order_on_cpu(monkeypatch, policy, d, hkv, group, page, dtype, backend):
    """dense_prefill.fused_step (the GPU path's order and row bookkeeping) with reference
    kernels: the write joins before the decode rows read, every gathered row that attention
    reads is filled, each output row comes from its own path; against the fresh reference.
    Fresh runs from 50 tokens, padded to a multiple of 32 rows (64 tokens: no padding, views of
    qkv), so the small steps take the bucketed path."""
    _reference_backends(monkeypatch)
    monkeypatch.setattr(dense_prefill, "CUDNN_MIN_FRESH", 50)
    monkeypatch.setattr(dense_prefill, "CUDNN_BUCKET", 32)
    hq = hkv * group
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    gen = torch.Generator().manual_seed(11)
    for seq_lens, q_lens in STEPS:
        pool, tables = _pool_with_prefix(layout, seq_lens, q_lens, gen)
        n = sum(q_lens)
        q = torch.randn(n, hq, d, generator=gen)
        k, v = _outlier(n, hkv, d, gen), torch.randn(n, hkv, d, generator=gen)
        qkv = torch.cat((q, k, v), 1).reshape(n, -1).to(dtype)
        slots = _slots(layout, tables, seq_lens, q_lens)
        # the new tokens' slots hold poison until the write joins
        poison = kv_cache.new_pool(layout, 1, 1, poison=0x5A)[0][0]
        for s in slots.tolist():
            page_id, off = divmod(s, page)
            for lo, size in ((layout.k_codes, layout.code_bytes), (layout.v_codes,
                             layout.code_bytes), (layout.k_params, layout.param_bytes),
                             (layout.v_params, layout.param_bytes)):
                pool[page_id, :, lo + off * size:lo + (off + 1) * size] = \
                    poison[:, lo:lo + size]
        written = pool.clone()
        plan = dense_prefill.PrefillPlan.build(q_lens, seq_lens, slots)
        kern = _ReferenceKernels(layout, hq)
        out = torch.full((n, hq * d), float("nan"), dtype=dtype)
        res = dense_prefill.fused_step(kern, qkv, pool, layout, hq, tables,
                                       torch.tensor(seq_lens, dtype=torch.int32), plan,
                                       d ** -0.5, out=out, backend=backend)
        assert res.data_ptr() == out.data_ptr()
        assert kern.calls[0] == "write" and kern.calls.count("join") == 1
        if 1 in q_lens:
            assert kern.calls.index("join") < kern.calls.index(("decode", q_lens.count(1)))
        kv_cache.write_kv(written, layout, qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d),
                          qkv[:, (hq + hkv) * d:].reshape(n, hkv, d), slots)
        assert torch.equal(pool, written)
        want = reference.fresh_prefill_attention(
            qkv[:, :hq * d].reshape(n, hq, d).float(),
            qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d).float(),
            qkv[:, (hq + hkv) * d:].reshape(n, hkv, d).float(), pool, layout, tables,
            torch.tensor(seq_lens), q_lens, prefix_dtype=dtype)
        got = out.reshape(n, hq, d).float()
        assert torch.isfinite(got).all()
        u = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8
        err = (got - want).abs() / (want.abs().amax(-1, keepdim=True) + 1e-5)
        assert err.max() <= 4 * u, (seq_lens, q_lens, err.max().item() / u)


def test_fused_step_allocates_out_and_always_joins(monkeypatch):
    """out=None with a sequence that has nothing new (q_len 0, no decode rows) gets an output
    of the step's rows; an attention call that raises still joins the side-stream write."""
    _reference_backends(monkeypatch)
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32,kv,seed=5"), 128, 2, 32)
    hq, d = 8, 128
    gen = torch.Generator().manual_seed(3)
    seq_lens, q_lens = [40, 9, 70], [40, 0, 6]
    pool, tables = _pool_with_prefix(layout, seq_lens, q_lens, gen)
    n = sum(q_lens)
    qkv = torch.randn(n, (hq + 4) * d, generator=gen).to(torch.bfloat16)
    slots = _slots(layout, tables, seq_lens, q_lens)
    plan = dense_prefill.PrefillPlan.build(q_lens, seq_lens, slots)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    kern = _ReferenceKernels(layout, hq)
    res = dense_prefill.fused_step(kern, qkv, pool, layout, hq, tables, lens, plan, d ** -0.5)
    assert res.shape == (n, hq * d) and torch.isfinite(res.float()).all()

    def boom(*args):
        raise RuntimeError("attention failed")
    monkeypatch.setattr(dense_prefill, "flash_varlen", boom)
    kern = _ReferenceKernels(layout, hq)
    with pytest.raises(RuntimeError, match="attention failed"):
        dense_prefill.fused_step(kern, qkv, pool, layout, hq, tables, lens, plan, d ** -0.5,
                                 backend="flash")
    assert kern.calls[0] == "write" and kern.calls[-1] == "join" and kern.pending is None
