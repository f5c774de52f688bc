"""The fresh-K/V dense prefill on the GPU (saw_gather_kv + torch's flash / cuDNN attention)
against the PyTorch reference (reference.fresh_prefill_attention, fp32).

Tolerances, stated: the dequantized prefix is rounded to the activation dtype once (the
reference rounds it the same way: prefix_dtype), the attention library rounds P to the
activation dtype before P.V and the output once: |out - ref| <= 4 u * max|ref row| elementwise,
||out - ref|| / ||ref|| <= 2 u (u = 2^-8 bf16, 2^-11 fp16), as for the INT4 kernels
(test_kernels_gpu.py). Inputs: fresh random data, outlier-heavy K, lengths that are not
multiples of the page or tile sizes, pages in random order, block-table padding outside the
pool, outputs poisoned with NaN.
"""
from __future__ import annotations

import pytest
import torch

from sawtrt import kv_cache, reference
from sawtrt.kernels import dense_prefill, library, ops
from sawtrt.spec import KVPolicy, PageLayout

pytestmark = pytest.mark.gpu

_LIB = library.try_load()
if not torch.cuda.is_available() or _LIB is None or not hasattr(_LIB, "saw_gather_kv"):
    pytest.skip("needs a CUDA GPU and libsawtrt_kernels.so with saw_gather_kv",
                allow_module_level=True)

from test_kernels_gpu import (DEV, DTYPES, _gen, build_batch, check_close,  # noqa: E402
                              outlier_heads, policies)

torch.backends.cuda.matmul.allow_tf32 = False


def _u(dt):
    return 2.0 ** -8 if dt == torch.bfloat16 else 2.0 ** -11


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("policy_i", range(7))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gather_kv_matches_reference(d, policy_i, dtype):
    dt = DTYPES[dtype]
    page = (16, 32, 64, 128)[(policy_i + d // 64) % 4]
    hkv = 2
    layout = PageLayout(KVPolicy.parse(policies(d)[policy_i]), d, hkv, page)
    gen = _gen(500 + d + policy_i)
    seq_lens, q_lens = [97, 1, 230, 54], [0, 0, 0, 0]
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, 2 * hkv, dt, gen)
    prefix = [97, 0, 229, 17]               # read part of each sequence
    starts = [3, 103, 103, 340]             # rows with gaps between sequences
    rows = 400
    cfg = ops.kernel_config(layout, 2 * hkv, dt, DEV)
    td = tables.to(DEV)
    lens_d = torch.tensor(prefix, dtype=torch.int32, device=DEV)
    starts_d = torch.tensor(starts, dtype=torch.int32, device=DEV)
    k, v = dense_prefill.gather_prefix(pool, layout, cfg, td, lens_d, starts_d, rows,
                                       max(prefix), dt)
    # gather_prefix leaves other rows as torch.empty: poison a second run to see what is written
    kp = torch.full((rows, hkv, d), float("nan"), dtype=dt, device=DEV)
    vp = torch.full_like(kp, float("nan"))
    lib = library.load()
    import ctypes
    library.check(lib.saw_gather_kv(
        ctypes.byref(cfg), pool.data_ptr(), td.data_ptr(), td.shape[1], lens_d.data_ptr(),
        starts_d.data_ptr(), 4, max(prefix), kp.data_ptr(), vp.data_ptr(), hkv * d,
        ops._stream(DEV)), lib)
    torch.cuda.synchronize()
    written = torch.zeros(rows, dtype=torch.bool)
    for b in range(4):
        r = slice(starts[b], starts[b] + prefix[b])
        written[r] = True
        want_k, want_v = reference.gather_kv_unrotated(pool, layout, tables[b].to(DEV), prefix[b])
        for got, got2, want, what in ((k[r], kp[r], want_k, "K"), (v[r], vp[r], want_v, "V")):
            assert torch.equal(got, got2)
            err = (got.float() - want).abs()
            row = want.abs().amax(-1, keepdim=True)
            assert (err <= _u(dt) * row + 1e-6).all(), \
                f"{what} of seq {b}: max err {(err / (row + 1e-6)).max().item():.3g} x row max"
    assert torch.isnan(kp[~written.to(DEV)]).all() and torch.isnan(vp[~written.to(DEV)]).all()


def _step_case(layout, hq, dt, seq_lens, q_lens, gen):
    """(pool with prefixes, tables, qkv, slots, plan) for one step."""
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=False)
    n, hkv, d = sum(q_lens), layout.num_kv_heads, layout.head_dim
    q = torch.randn(n, hq, d, generator=gen)
    k = outlier_heads(n, hkv, d, gen, 2.0)
    v = torch.randn(n, hkv, d, generator=gen) * 2
    qkv = torch.cat([q, k, v], 1).reshape(n, -1).to(dt).to(DEV)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    slots = ops.step_slots(layout, tables, torch.tensor(seq_lens), cu, n)
    plan = dense_prefill.PrefillPlan.build(q_lens, seq_lens, slots, DEV)
    return pool, tables.to(DEV), qkv, cu.to(DEV), slots, plan


def _reference(qkv, pool, layout, hq, tables, seq_lens, q_lens, dt):
    n, hkv, d = qkv.shape[0], layout.num_kv_heads, layout.head_dim
    q = qkv[:, :hq * d].reshape(n, hq, d).float()
    k = qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d).float()
    v = qkv[:, (hq + hkv) * d:].reshape(n, hkv, d).float()
    return reference.fresh_prefill_attention(q, k, v, pool, layout, tables,
                                             torch.tensor(seq_lens), q_lens, prefix_dtype=dt)


STEPS = [  # (seq_lens, q_lens): chunk over a prefix + decode rows + a fresh prompt; ragged fresh
    ([54, 97, 1, 200, 130], [54, 33, 1, 1, 64]),
    ([17, 300, 5], [5, 129, 5]),
    ([77, 77], [77, 77]),                    # one length: the cuDNN path
    ([300, 300], [45, 45]),                  # one length over one prefix: split / flash
]
GROUPS = [1, 2, 4, 8, 16]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("policy_i", [0, 1, 2, 3, 5, 6])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fresh_step_matches_reference(d, policy_i, dtype):
    dt = DTYPES[dtype]
    idx = d // 64 + 3 * policy_i + (dtype == "bf16")
    group = GROUPS[idx % 5]
    hkv = 1 if group == 16 else 2
    hq = hkv * group
    page = (16, 32, 64, 128)[idx % 4]
    layout = PageLayout(KVPolicy.parse(policies(d)[policy_i]), d, hkv, page)
    gen = _gen(900 + idx)
    for s, (seq_lens, q_lens) in enumerate(STEPS):
        pool, tables, qkv, cu, slots, plan = _step_case(layout, hq, dt, seq_lens, q_lens, gen)
        ref_pool = pool.clone()
        n = qkv.shape[0]
        out = torch.full((n, hq * d), float("nan"), dtype=dt, device=DEV)
        res = ops.attention_step(qkv, pool, layout, hq, tables, torch.tensor(seq_lens, device=DEV,
                                 dtype=torch.int32), cu, max(q_lens), out=out, plan=plan)
        assert res.data_ptr() == out.data_ptr()
        torch.cuda.synchronize()
        hkv_d = hkv * d
        # the spec's write is the CPU reference (torch's CUDA x / 15 is x * (1/15))
        ref_pool = ref_pool.cpu()
        qc = qkv.cpu()
        kv_cache.write_kv(ref_pool, layout, qc[:, hq * d:hq * d + hkv_d].reshape(n, hkv, d),
                          qc[:, hq * d + hkv_d:].reshape(n, hkv, d), slots)
        assert torch.equal(pool.cpu(), ref_pool), "the step wrote other bytes than the spec"
        ref = _reference(qkv, pool, layout, hq, tables, seq_lens, q_lens, dt)
        # decode rows come from the decode kernel, held to bf16's u (test_kernels_gpu.py)
        check_close(out.reshape(n, hq, d), ref, dt, f"fresh {layout.policy} d={d} g={group} "
                    f"step {s} ({dense_prefill.choose_backend(plan)})",
                    unit=torch.bfloat16 if 1 in q_lens else None)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("small", [True, False])
def test_bucketed_fresh_runs_match_reference(monkeypatch, dtype, small):
    """auto's padded cuDNN calls for fresh runs, beside flash varlen for a chunk over a prefix
    and the decode kernel for a decode row, against the reference. small: runs from 50 tokens
    padded to a multiple of 64 rows (two runs around a chunk, one run alone); else the real constants (a
    1 300-token run padded to 1 536 beside a 200-token chunk over 500 cached). A 128-token
    run fills two buckets: cuDNN reads it as views of the step's qkv rows, unpadded."""
    if small:
        monkeypatch.setattr(dense_prefill, "CUDNN_MIN_FRESH", 50)
        monkeypatch.setattr(dense_prefill, "CUDNN_BUCKET", 64)
        steps = [([70, 40, 1, 90], [70, 12, 1, 90]), ([130], [130]), ([128, 9], [128, 1])]
    else:
        steps = [([1300, 700], [1300, 200])]
    dt, d, hkv, hq, page = DTYPES[dtype], 128, 2, 8, 64
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=64,kv,seed=11"), d, hkv, page)
    gen = _gen(41 + small)
    for seq_lens, q_lens in steps:
        pool, tables, qkv, cu, slots, plan = _step_case(layout, hq, dt, seq_lens, q_lens, gen)
        assert dense_prefill.choose_backend(plan, key=(d, dt)) == "cudnn-bucket"
        n = qkv.shape[0]
        out = torch.full((n, hq * d), float("nan"), dtype=dt, device=DEV)
        dense_prefill.attention_step(qkv, pool, layout, hq, tables,
                                     torch.tensor(seq_lens, device=DEV, dtype=torch.int32), plan,
                                     out=out)
        torch.cuda.synchronize()
        assert dense_prefill.choose_backend(plan, key=(d, dt)) == "cudnn-bucket", "cuDNN refused"
        ref = _reference(qkv, pool, layout, hq, tables, seq_lens, q_lens, dt)
        check_close(out.reshape(n, hq, d), ref, dt, f"bucketed {seq_lens}/{q_lens}",
                    unit=torch.bfloat16 if 1 in q_lens else None)


@pytest.mark.parametrize("backend", ["flash", "cudnn", "cudnn-split", "cudnn-seq"])
def test_backends_agree_on_chunks(backend):
    """Every dense backend on the shapes it serves; several chunks of one prompt, each over the
    INT4 pages the previous chunks wrote."""
    dt, d, hkv, hq, page = torch.bfloat16, 128, 2, 8, 64
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=64,kv,seed=11"), d, hkv, page)
    gen = _gen(77)
    total, chunks = 700, [256, 256, 188]
    tables = torch.randperm(total // page + 2, generator=gen)[None, :].int().to(DEV)
    pool = kv_cache.new_pool(layout, 1, total // page + 2, DEV, poison=0x5A)[0]
    qkv_all = torch.cat([torch.randn(total, hq, d, generator=gen),
                         outlier_heads(total, hkv, d, gen, 2.0),
                         torch.randn(total, hkv, d, generator=gen)], 1).reshape(total, -1)
    qkv_all = qkv_all.to(dt).to(DEV)
    start = 0
    for c, m in enumerate(chunks):
        qkv = qkv_all[start:start + m]
        seq_lens, q_lens = [start + m], [m]
        pos = torch.arange(start, start + m, device=DEV)
        slots = tables[0, pos // page].long() * page + pos % page
        plan = dense_prefill.PrefillPlan.build(q_lens, seq_lens, slots.cpu(), DEV)
        out = dense_prefill.attention_step(qkv, pool, layout, hq, tables,
                                           torch.tensor(seq_lens, device=DEV), plan,
                                           backend=backend)
        torch.cuda.synchronize()
        ref = _reference(qkv, pool, layout, hq, tables, seq_lens, q_lens, dt)
        check_close(out.reshape(m, hq, d), ref, dt,
                    f"chunk {c} {backend} -> {dense_prefill.choose_backend(plan, backend)}")
        start += m


def test_decode_rows_are_the_decode_kernel():
    """In a mixed step the decode rows equal saw_decode over the same pool bit for bit."""
    dt, d, hkv, hq = torch.bfloat16, 128, 8, 32
    layout = PageLayout(KVPolicy.parse("int4-bdr"), d, hkv, 64)
    seq_lens, q_lens = [300, 1000, 90, 513], [1, 1, 90, 1]
    gen = _gen(5)
    pool, tables, qkv, cu, slots, plan = _step_case(layout, hq, dt, seq_lens, q_lens, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    out = ops.attention_step(qkv, pool, layout, hq, tables, lens, cu, 90, plan=plan)
    rows = torch.tensor([0, 1, 92], device=DEV)
    seqs = torch.tensor([0, 1, 3], device=DEV)
    want = ops.paged_attention(qkv[rows, :hq * d].reshape(3, hq, d), pool, layout,
                               tables[seqs], lens[seqs], None, max_q_len=1,
                               max_seq_len=tables.shape[1] * 64)
    assert torch.equal(out[rows].reshape(3, hq, d), want)


def test_engine_fresh_matches_reference_engine(tmp_path, monkeypatch):
    """The GPU engine with fresh prefill (chunked prompts, mixed steps) against the same engine
    with dense_prefill routed to the PyTorch reference: logits agree to bf16 noise."""
    from runtime_helpers import build_tiny, replace
    from sawtrt.engine.llm_engine import LLMEngine
    from sawtrt.models.specs import get_spec
    from test_runtime_gpu import _run_recording
    spec = replace(get_spec("qwen3-0.6b"), num_layers=2, vocab_size=2048, max_position=512,
                   eos_token_id=None, bos_token_id=None)
    d = build_tiny(tmp_path, spec, kv_cache="int4-bdr", max_seq_len=256, name="fp")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (1, 17, 97, 150)]
    kw = dict(device="cuda", max_num_batched_tokens=64, max_num_seqs=8)
    eng = LLMEngine.from_engine_dir(d, **kw)
    assert eng.model.prefill_kv == "fresh"          # auto: the kernels serve every layer
    assert eng.runner.graphs, eng.runner.graph_note  # decode steps replay CUDA graphs
    # what ran: fresh-path steps with decode rows beside prompt chunks, graph-replayed decode
    mixed, replayed = [], []
    step = dense_prefill.fused_step
    monkeypatch.setattr(dense_prefill, "fused_step", lambda kern, qkv, pool, layout, hq, tables,
                        lens, plan, *a, **k: mixed.append(plan.decode_seqs is not None)
                        or step(kern, qkv, pool, layout, hq, tables, lens, plan, *a, **k))
    forward = eng.runner.forward
    eng.runner.forward = lambda batch: replayed.append(batch.is_decode) or forward(batch)
    outs, rec = _run_recording(eng, prompts)
    assert any(mixed) and any(replayed), (mixed, replayed)
    monkeypatch.setattr(dense_prefill, "gpu_serves", lambda *a: False)
    ref = LLMEngine.from_engine_dir(d, prefill_kv="fresh", cuda_graphs=False, **kw)
    ref_outs, ref_rec = _run_recording(ref, prompts)
    for i in range(len(prompts)):
        a, b = rec[f"g{i}"], ref_rec[f"g{i}"]
        # compare while both runs fed the same tokens (a near-tie may pick different ones)
        same = [x == y for x, y in zip(outs[i], ref_outs[i])]
        n = same.index(False) + 1 if False in same else len(same)
        rel = ((a[:n] - b[:n]).norm() / b[:n].norm()).item()
        print(f"prompt {len(prompts[i])}: {n} steps compared, rel. logit difference {rel:.4f}")
        assert rel < 0.03
    cache = LLMEngine.from_engine_dir(d, prefill_kv="cache", **kw)
    assert cache.model.prefill_kv == "cache"
    _run_recording(cache, prompts)


def _worst(err_rows, what, rows):
    """'what: max X u at token t head h' from per-row errors [len(rows), H] (u); rows: the
    step's token index of each row."""
    i, h = divmod(int(err_rows.flatten().argmax()), err_rows.shape[1])
    return f"{what}: max {err_rows.max().item():.2f} u at token {int(rows[i])} head {h}"


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mixed_step_rows_by_path(monkeypatch, dtype, overlap):
    """The configuration of test_fresh_step_matches_reference[64-1-fp16] (int8 pages, D = 64,
    one KV head, GQA group 16, page 16, the mixed step), checked path by path so a failure
    names its source: the decode rows against saw_decode called alone on the same inputs (bit
    for bit, with the step's strided q and with a contiguous copy) and against the reference;
    the dense rows against the reference; no output row exactly zero where the reference's
    is not (the decode kernel writes 0 for a head whose softmax sum is not > 0, NaN included).
    Both write orders: the side stream (decode rows after the dense rows) and the serial one."""
    monkeypatch.setattr(dense_prefill, "OVERLAP_WRITE", overlap)
    dt = DTYPES[dtype]
    d, hkv, group, page = 64, 1, 16, 16
    hq = hkv * group
    layout = PageLayout(KVPolicy.parse("int8"), d, hkv, page)
    gen = _gen(904)                          # test_fresh_step's seed for this configuration
    seq_lens, q_lens = STEPS[0]
    pool, tables, qkv, cu, slots, plan = _step_case(layout, hq, dt, seq_lens, q_lens, gen)
    n = qkv.shape[0]
    lens = torch.tensor(seq_lens, device=DEV, dtype=torch.int32)
    out = torch.full((n, hq * d), float("nan"), dtype=dt, device=DEV)
    ops.attention_step(qkv, pool, layout, hq, tables, lens, cu, max(q_lens), out=out, plan=plan)
    torch.cuda.synchronize()
    ref = _reference(qkv, pool, layout, hq, tables, seq_lens, q_lens, dt)
    got = out.reshape(n, hq, d).float()
    row = ref.float().abs().amax(-1)
    err = (got - ref.float()).abs().amax(-1) / (row + 1e-5) / 2.0 ** -8      # [n, hq], bf16 u
    zero = (got.abs().amax(-1) == 0) & (row > 0)
    dec, seqs = plan.decode_rows, plan.decode_seqs
    dense = torch.ones(n, dtype=torch.bool, device=DEV)
    dense[dec] = False
    # saw_decode alone, on the pool after the step, with the step's own arguments
    cfg = ops.kernel_config(layout, hq, dt, DEV)
    alone = {}
    for name, qd in (("strided q", qkv.index_select(0, dec)),
                     ("contiguous q", qkv.index_select(0, dec)[:, :hq * d].contiguous())):
        od = torch.full((qd.shape[0], hq * d), float("nan"), dtype=dt, device=DEV)
        td = tables.index_select(0, seqs)
        _decode_direct_rows(cfg, qd, pool, td, lens.index_select(0, seqs), plan.max_decode, od)
        alone[name] = od
    torch.cuda.synchronize()
    every = torch.arange(n, device=DEV)
    report = [_worst(err[dec], "decode rows", dec),
              _worst(err[dense], "dense rows", every[dense]),
              f"exactly-zero (token, head) rows {zero.nonzero().tolist()}"]
    for name, od in alone.items():
        e = (od.reshape(-1, hq, d).float() - ref[dec].float()).abs().amax(-1)
        report.append(_worst(e / (row[dec] + 1e-5) / 2.0 ** -8, f"saw_decode alone ({name})",
                             dec))
        report.append(f"  equal to the step's decode rows: {torch.equal(od, out[dec])}")
    print("\n".join(report))
    assert not zero.any(), "; ".join(report)
    for name, od in alone.items():
        assert torch.equal(od, out[dec]), "; ".join(report)
    assert err[dec].max() <= 4 and err[dense].max() <= 4, "; ".join(report)


def _decode_direct_rows(cfg, qd, pool, tables, lens, max_len, out):
    import ctypes
    lib = library.load()
    b = qd.shape[0]
    ws_bytes = int(lib.saw_workspace_bytes(ctypes.byref(cfg), b, b, max_len))
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=DEV)
    library.check(lib.saw_decode(ctypes.byref(cfg), qd.data_ptr(), qd.stride(0), pool.data_ptr(),
                                 tables.data_ptr(), tables.shape[1], lens.data_ptr(), b, max_len,
                                 out.data_ptr(), ws.data_ptr(), ws_bytes, ops._stream(DEV)), lib)


@pytest.mark.parametrize("policy", ["int4-bdr", "int4", "int8"])
@pytest.mark.parametrize("step", [0, 3])          # mixed (decode rows), chunk over a prefix
def test_side_stream_write_equals_serial(monkeypatch, policy, step):
    """The page write on its side stream (OVERLAP_WRITE, the default) and first on the current
    stream give the same pages and the same outputs bit for bit; the decode rows of the mixed
    step read their own token from the pages the side stream wrote."""
    dt, d, hkv, hq, page = torch.bfloat16, 128, 2, 8, 32
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    seq_lens, q_lens = STEPS[step]
    pool, tables, qkv, cu, slots, plan = _step_case(layout, hq, dt, seq_lens, q_lens, _gen(31))
    lens = torch.tensor(seq_lens, device=DEV, dtype=torch.int32)
    runs = {}
    for overlap in (True, False):
        monkeypatch.setattr(dense_prefill, "OVERLAP_WRITE", overlap)
        p = pool.clone()
        torch.cuda.synchronize()
        out = ops.attention_step(qkv, p, layout, hq, tables, lens, cu, max(q_lens), plan=plan)
        runs[overlap] = (out, p)
    torch.cuda.synchronize()
    assert torch.equal(runs[True][1], runs[False][1]), "the pages differ"
    assert torch.equal(runs[True][0], runs[False][0]), "the outputs differ"
    ref = _reference(qkv, runs[True][1], layout, hq, tables, seq_lens, q_lens, dt)
    check_close(runs[True][0].reshape(-1, hq, d), ref, dt, f"side-stream write {policy}",
                unit=torch.bfloat16 if 1 in q_lens else None)
