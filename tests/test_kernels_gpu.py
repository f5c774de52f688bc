"""CUDA kernels against the PyTorch reference (needs a GPU and libsawtrt_kernels.so).

* write: whole pools compared byte for byte with sawtrt.kv_cache.write_kv (CPU), NaN/Inf/huge
  and constant tokens included, padding slots (-1) skipped, slots in random order.
* attention (prefill, decode, the fused step): compared with sawtrt.reference.paged_attention
  in fp32 on the same pool. Tolerance, stated: bf16/fp16 rounding of the result. With u the
  unit roundoff (2^-8 bf16, 2^-11 fp16): |out - ref| <= 4 u * max|ref row| elementwise and
  ||out - ref|| / ||ref|| <= 2 u (bf16: 1.6 % / 0.8 %; fp16: 0.2 % / 0.1 %). The kernels round
  p * s_v and the output to the activation type. The prefill kernel's query operand is the
  rotated query rounded to fp16, and its reference rounds it the same way (query_operand); a
  rotated query rounded to bf16 once gave 10 % errors on these outlier-heavy inputs; fp16
  rounding moves the output by ~1e-3 relative Frobenius (up to 2e-2 of a row's max) where the
  INT4 cache itself moves it by ~0.4 (up to 3x a row's max; CPU measurement in
  docs/performance.md). The decode kernel rounds
  p * s_v to bf16 for either activation type (p * s_v falls below fp16's normal range for small
  scales), so decode results are held to bf16's u. Inputs
  are fresh random data with outlier-heavy K (a few channels 20-100x larger), so softmax rows
  are peaked.
* every output element is written (outputs start as NaN), lengths are not multiples of the page
  or tile sizes, pages are in random order, padding entries of the block tables point outside
  the pool (a stray read faults).
* int8 decode must run the decode kernel (saw_decode, the fused step and ops.paged_attention):
  ERR_UNSUPPORTED fails the test instead of skipping it, and ops.paged_attention's output must
  equal saw_decode's bit for bit (the prefill fallback rounds differently).
"""
from __future__ import annotations

import ctypes
import math

import pytest
import torch

from sawtrt import kv_cache, reference
from sawtrt.kernels import capi, library, ops
from sawtrt.spec import KVPolicy, PageLayout

pytestmark = pytest.mark.gpu

_LIB = library.try_load()
if not torch.cuda.is_available() or _LIB is None:
    pytest.skip("needs a CUDA GPU and libsawtrt_kernels.so", allow_module_level=True)

DEV = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False   # the reference must really be fp32
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
_TOL_MAX = 4      # max abs error <= 4 u * max|ref row|
_TOL_FRO = 2      # ||err|| / ||ref|| <= 2 u
BAD_PAGE = 1 << 26  # block-table padding: an address far outside any pool


def policies(d: int) -> list[str]:
    return ["bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=16", "int4-bdr:h=32,kv,seed=5",
            f"int4-bdr:h={d},kv"]


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def outlier_heads(n, heads, d, gen, scale=1.0):
    """[n, heads, d] fp32 with 4 fixed outlier channels per head, 20-100x larger."""
    x = torch.randn(n, heads, d, generator=gen) * scale
    for h in range(heads):
        ch = torch.randperm(d, generator=gen)[:4]
        x[:, h, ch] *= 20 + 80 * torch.rand(4, generator=gen)
    return x


def _signs_buf(layout):
    s = layout.policy.signs(layout.head_dim)
    return None if s is None else s.to(DEV)


def make_cfg(layout, hq, dtype, signs):
    return library.make_config(layout, hq, dtype, signs_ptr=0 if signs is None else
                               signs.data_ptr())


def _stream():
    return torch.cuda.current_stream().cuda_stream


# ------------------------------------------------------------------------------------ write
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("policy_i", range(7))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_write_kv_bit_exact(d, policy_i, dtype):
    dt = DTYPES[dtype]
    page = (16, 32, 64, 128)[(policy_i + d) % 4]
    hkv, hq, t = 2, 6, 97
    layout = PageLayout(KVPolicy.parse(policies(d)[policy_i]), d, hkv, page)
    gen = _gen(1000 * d + 10 * policy_i + len(dtype))
    q = torch.randn(t, hq, d, generator=gen)
    k = outlier_heads(t, hkv, d, gen, 2.0)
    v = torch.randn(t, hkv, d, generator=gen) * 3
    k[3, 0, 5], k[3, 1, 7], v[4, 0, 0] = float("nan"), float("inf"), float("-inf")
    k[5, 1, :] = 1.2345          # constant vector: scale 0 (or the fp16 gap), codes 0
    k[6, 0, 9] = 6e4 if dt == torch.float16 else 1e6   # clamped to spec.CLAMP
    qkv = torch.cat([q, k, v], 1).reshape(t, -1).to(dt)
    num_pages = (t + page - 1) // page + 3
    slots = torch.randperm(num_pages * page, generator=gen)[:t].int()
    slots[::13] = -1
    signs = _signs_buf(layout)
    cfg = make_cfg(layout, hq, dt, signs)
    pool = kv_cache.new_pool(layout, 1, num_pages, DEV, poison=0xA5)[0]
    qkv_d, slots_d = qkv.to(DEV), slots.to(DEV)
    capi.write_kv_ptr(cfg, qkv_d.data_ptr(), qkv_d.stride(0), slots_d.data_ptr(), t,
                      pool.data_ptr(), _stream())
    ref = kv_cache.new_pool(layout, 1, num_pages, poison=0xA5)[0]
    kk = qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d)
    vv = qkv[:, (hq + hkv) * d:].reshape(t, hkv, d)
    kv_cache.write_kv(ref, layout, kk, vv, slots.long())
    got = pool.cpu()
    bad = (got != ref).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first at {bad[:5].tolist()}"


# -------------------------------------------------------------------------------- attention
def scattered_tables(seq_lens, page, gen, spare):
    """(block tables in random page order, padded with BAD_PAGE; pool size incl. `spare` pages)."""
    npages = [(n + page - 1) // page for n in seq_lens]
    total = sum(npages) + spare
    perm = torch.randperm(total, generator=gen).tolist()
    tables = torch.full((len(seq_lens), max(npages) + 1), BAD_PAGE, dtype=torch.int32)
    at = 0
    for b, n in enumerate(npages):
        tables[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return tables, total


def build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=True):
    """Pool with every sequence's cache written (reference write), random page order."""
    page, hkv, d = layout.page_size, layout.num_kv_heads, layout.head_dim
    tables, total = scattered_tables(seq_lens, page, gen, spare=2)
    pool = kv_cache.new_pool(layout, 1, total, DEV, poison=0x5A)[0]
    for b, n in enumerate(seq_lens):
        if not prefill_cache:
            n -= q_lens[b]
        if n <= 0:
            continue
        pos = torch.arange(n)
        slots = tables[b, pos // page].long() * page + pos % page
        k = outlier_heads(n, hkv, d, gen, 2.0).to(dt)
        v = (torch.randn(n, hkv, d, generator=gen) * 2).to(dt)
        kv_cache.write_kv(pool, layout, k.to(DEV), v.to(DEV), slots.to(DEV))
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dt)
    return pool, tables, q


def check_close(out, ref, dt, what, unit=None):
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    err = (out.float() - ref.float()).abs()
    row = ref.float().abs().amax(-1, keepdim=True)
    eps = _EPS[unit or dt]
    rel = err / (row + 1e-5)
    worst = rel.max().item()
    fro = (err.norm() / ref.float().norm().clamp_min(1e-12)).item()
    # where: the index of the worst row (token, head for [T, H, D] outputs)
    at = [int(i) for i in torch.unravel_index(rel.amax(-1).flatten().argmax(), rel.shape[:-1])]
    print(f"ERR {what} {str(dt)[6:]}: max {worst / eps:.2f} u at row {at}, fro {fro / eps:.2f} u")
    assert worst <= _TOL_MAX * eps, (
        f"{what}: max err {worst:.3g} x row max > {_TOL_MAX} u at row {at} (out row max "
        f"{out[tuple(at)].float().abs().max():.3g}, ref row max {row[tuple(at)].item():.3g})")
    assert fro <= _TOL_FRO * eps, f"{what}: relative Frobenius error {fro:.3g} > {_TOL_FRO} u"
    return worst, fro


BATCHES = [  # (seq_lens, q_lens): mixed chunked prefill, a fresh prompt, decode rows
    ([54, 97, 1, 200, 130], [54, 33, 1, 1, 64]),
    ([17, 300], [5, 129]),
]
GROUPS = [1, 2, 4, 8, 16]


def _case(d, policy_i, dtype):
    """One parametrised attention case: (act dtype, case index, GQA group, KV heads, page size,
    layout); the index spreads groups and page sizes over the D x policy x dtype grid."""
    dt = DTYPES[dtype]
    idx = d // 64 + 3 * policy_i + (dtype == "bf16")
    group = GROUPS[idx % 5]
    hkv = 1 if group == 16 else 2
    page = (16, 32, 64, 128)[idx % 4]
    layout = PageLayout(KVPolicy.parse(policies(d)[policy_i]), d, hkv, page)
    return dt, idx, group, hkv, page, layout


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("policy_i", range(7))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_prefill_matches_reference(d, policy_i, dtype):
    dt, idx, group, hkv, page, layout = _case(d, policy_i, dtype)
    seq_lens, q_lens = BATCHES[idx % 2]
    gen = _gen(idx * 7919 + d)
    pool, tables, q = build_batch(layout, seq_lens, q_lens, hkv * group, dt, gen)
    signs = _signs_buf(layout)
    cfg = make_cfg(layout, hkv * group, dt, signs)
    tables_d = tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEV)
    qd = q.to(DEV)
    n = qd.shape[0]
    out = torch.full((n, hkv * group, d), float("nan"), dtype=dt, device=DEV)
    ws_bytes = capi.workspace_bytes(cfg, len(seq_lens), n, max(seq_lens))
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=DEV)
    capi.prefill_ptr(cfg, qd.data_ptr(), qd.stride(0), pool.data_ptr(), tables_d.data_ptr(),
                     tables.shape[1], lens_d.data_ptr(), cu.data_ptr(), len(seq_lens), n,
                     max(q_lens), max(seq_lens), out.data_ptr(), ws.data_ptr(), ws_bytes,
                     _stream())
    torch.cuda.synchronize()
    ref = reference.paged_attention(qd.float(), pool, layout, tables_d, lens_d.cpu(),
                                    torch.tensor(q_lens), None, query_operand=torch.float16)
    check_close(out, ref, dt, f"prefill D={d} {layout.policy} G={group} page={page}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("policy_i", [0, 1, 2, 3, 5, 6])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_matches_reference(d, policy_i, dtype):
    dt, idx, group, hkv, page, layout = _case(d, policy_i, dtype)
    seq_lens = [1, 54, 97, 700, 2053][: 3 + idx % 3]
    gen = _gen(idx * 104729 + d)
    pool, tables, q = build_batch(layout, seq_lens, [1] * len(seq_lens), hkv * group, dt, gen)
    signs = _signs_buf(layout)
    cfg = make_cfg(layout, hkv * group, dt, signs)
    tables_d = tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    qd = q.to(DEV)
    b = len(seq_lens)
    out = torch.full((b, hkv * group, d), float("nan"), dtype=dt, device=DEV)
    ws_bytes = capi.workspace_bytes(cfg, b, b, max(seq_lens))
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=DEV)
    try:
        capi.decode_ptr(cfg, qd.data_ptr(), qd.stride(0), pool.data_ptr(), tables_d.data_ptr(),
                        tables.shape[1], lens_d.data_ptr(), b, max(seq_lens), out.data_ptr(),
                        ws.data_ptr(), ws_bytes, _stream())
    except library.SawKernelError as e:
        if e.code == library.ERR_UNSUPPORTED and layout.policy.kind not in _DECODE_KINDS:
            pytest.skip(f"decode kernel: {e.message}")
        raise
    torch.cuda.synchronize()
    ref = reference.paged_attention(qd.float(), pool, layout, tables_d, lens_d.cpu(), None, None)
    check_close(out, ref, dt, f"decode D={d} {layout.policy} G={group} page={page}",
                unit=torch.bfloat16)


_DECODE_KINDS = ("bf16", "int8", "int4", "int4-bdr")   # saw_decode must serve these


@pytest.mark.parametrize("policy", ["bf16", "int8", "int4", "int4-bdr"])
@pytest.mark.parametrize("d, group", [(64, 4), (64, 16), (128, 16), (256, 8), (256, 16)])
def test_decode_very_negative_scores(policy, d, group):
    """Every token of a head scores the same value s (log2 units), from -20 down to -320 across
    the heads: the softmax is uniform whatever s, so the output is the mean of V and never zero.
    The softmax origin has to move to the scores (2^s alone underflows below s = -126); both
    n-tiles of a 16-head group, one and several tiles and warps."""
    hkv, page = 1, 16
    hq = hkv * group
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    sm_scale = d ** -0.5
    scores = torch.linspace(-20.0, -320.0, hq)
    gen = _gen(d * 31 + group)
    for n in (1, 40, 300):
        pages = (n + page - 1) // page
        pool = kv_cache.new_pool(layout, 1, pages + 1, DEV, poison=0x5A)[0]
        tables = torch.randperm(pages + 1, generator=gen)[:pages][None].int().to(DEV)
        k = torch.zeros(n, hkv, d)
        k[..., 0] = 1.0                                   # q.k = q[0] on every token
        v = torch.randn(n, hkv, d, generator=gen)
        pos = torch.arange(n)
        slots = (tables[0, pos // page].long().cpu() * page + pos % page).to(DEV)
        kv_cache.write_kv(pool, layout, k.to(DEV, torch.bfloat16), v.to(DEV, torch.bfloat16),
                          slots)
        q = torch.zeros(1, hq, d)
        q[0, :, 0] = scores / (sm_scale * math.log2(math.e))
        qd = q.to(DEV, torch.bfloat16)
        lens = torch.tensor([n], dtype=torch.int32, device=DEV)
        cfg = make_cfg(layout, hq, torch.bfloat16, _signs_buf(layout))
        out = torch.full((1, hq, d), float("nan"), dtype=torch.bfloat16, device=DEV)
        _decode_direct(cfg, qd, pool, tables, lens, pages * page, out)
        torch.cuda.synchronize()
        zero = [round(scores[h].item()) for h in range(hq) if out[0, h].abs().max() == 0]
        assert not zero, f"len {n}: all-zero heads at scores {zero}"
        ref = reference.paged_attention(qd.float(), pool, layout, tables, lens.cpu(), None, None)
        check_close(out, ref, torch.bfloat16, f"len {n} D={d} {policy} G={group}")


def _decode_direct(cfg, qd, pool, tables_d, lens_d, max_len, out):
    """saw_decode through the C ABI; ERR_UNSUPPORTED (the old int8 answer) fails the test."""
    b = qd.shape[0]
    ws_bytes = capi.workspace_bytes(cfg, b, b, max_len)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=DEV)
    lib = library.load()
    code = lib.saw_decode(ctypes.byref(cfg), qd.data_ptr(), qd.stride(0), pool.data_ptr(),
                          tables_d.data_ptr(), tables_d.shape[1], lens_d.data_ptr(), b, max_len,
                          out.data_ptr(), ws.data_ptr(), ws_bytes, _stream())
    assert code != library.ERR_UNSUPPORTED, \
        f"saw_decode does not serve this config: {lib.saw_last_error_message().decode()}"
    library.check(code, lib)
    return ws_bytes


INT8_DECODE_CASES = [  # D, Hkv, group, page, lens: every (D, n-tile count) instantiation, odd
    (64, 2, 1, 16, [1, 15, 17, 300]),                   # groups, partial pages and tiles,
    (64, 1, 12, 32, [33, 1000]),                        # one long sequence among short ones
    (64, 2, 16, 128, [129, 7]),                         # (split-KV + reducer)
    (128, 8, 4, 64, [1, 54, 97, 1000, 3001]),           # qwen3-4b/8b shape
    (128, 2, 5, 16, [16, 64, 65]),
    (128, 1, 9, 64, [2053, 5]),
    (128, 2, 16, 32, [300, 31]),
    (256, 1, 8, 32, [3, 77, 1200]),
    (256, 4, 2, 64, [640, 1]),
    (256, 1, 16, 16, [40, 300]),
    (256, 2, 10, 128, [129, 257]),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", range(len(INT8_DECODE_CASES)))
def test_int8_decode_kernel(case, dtype):
    """INT8 pages through the decode kernel itself (not the prefill fallback): every head dim and
    both n-tile counts (groups <= 8 and 9..16), outlier-heavy K, V over the full code range, a
    constant (scale 0) K/V token, tiny-magnitude V heads (p * s_v in bf16 far below fp16's range)
    and a poisoned output; reference attention in fp32 on the same pool, decode tolerance."""
    d, hkv, group, page, seq_lens = INT8_DECODE_CASES[case]
    dt = DTYPES[dtype]
    hq = hkv * group
    layout = PageLayout(KVPolicy.parse("int8"), d, hkv, page)
    gen = _gen(7000 + 31 * case + len(dtype))
    tables, total = scattered_tables(seq_lens, page, gen, spare=3)
    pool = kv_cache.new_pool(layout, 1, total, DEV, poison=0x5A)[0]
    for b, n in enumerate(seq_lens):
        pos = torch.arange(n)
        slots = tables[b, pos // page].long() * page + pos % page
        k = outlier_heads(n, hkv, d, gen, 2.0)
        v = torch.randn(n, hkv, d, generator=gen) * 2 + torch.randn(1, hkv, d, generator=gen)
        v[:, 0] *= 1e-3 if b % 2 else 1.0           # a tiny-V head: s_v ~ 5e-5
        k[n // 2, :, :] = 0.75                      # a constant token: scale 0, codes 0
        v[n // 3, :, :] = -1.5
        kv_cache.write_kv(pool, layout, k.to(dt).to(DEV), v.to(dt).to(DEV), slots.to(DEV))
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dt)
    qd, tables_d = q.to(DEV), tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    signs = _signs_buf(layout)
    assert signs is None
    cfg = make_cfg(layout, hq, dt, signs)
    out = torch.full((len(seq_lens), hq, d), float("nan"), dtype=dt, device=DEV)
    _decode_direct(cfg, qd, pool, tables_d, lens_d, max(seq_lens), out)
    torch.cuda.synchronize()
    ref = reference.paged_attention(qd.float(), pool, layout, tables_d, lens_d.cpu(), None, None)
    check_close(out, ref, dt, f"int8 decode D={d} Hkv={hkv} G={group} page={page}",
                unit=torch.bfloat16)
    # the tiny-V rows (odd sequences, KV head 0) on their own: their norm is ~1e-3 of the
    # others', so the Frobenius check above would not see them
    check_close(out[1::2, :group], ref[1::2, :group], dt, "int8 decode, tiny-V rows",
                unit=torch.bfloat16)


def test_decode_supported_reports_the_instantiations():
    """saw_decode_supported: yes for every kind at the served shapes, no where saw_decode
    answers SAW_ERR_UNSUPPORTED (GQA group 17; page size 8)."""
    for kind in ("bf16", "int8", "int4", "int4-bdr"):
        for d, group in ((64, 4), (128, 4), (128, 12), (256, 8)):
            cfg = library.make_config(PageLayout(KVPolicy.parse(kind), d, 2), 2 * group,
                                      torch.bfloat16)
            assert library.decode_supported(cfg), (kind, d, group)
    cfg = library.make_config(PageLayout(KVPolicy("int8"), 128, 1), 17, torch.float16)
    assert not library.decode_supported(cfg)
    cfg = library.make_config(PageLayout(KVPolicy("int8"), 128, 2), 8, torch.float16)
    cfg.page_size = 8                     # the spec refuses it; the library must say no too
    assert not library.decode_supported(cfg)


def test_int8_decode_is_the_decode_kernel():
    """ops.paged_attention (decode form) on an int8 cache runs saw_decode: its output equals
    the direct C ABI call bit for bit; the prefill fallback's rounding would differ. Also
    captured in a CUDA graph and replayed."""
    dt, d, hkv, hq, page = torch.bfloat16, 128, 2, 8, 64
    layout = PageLayout(KVPolicy.parse("int8"), d, hkv, page)
    gen = _gen(808)
    seq_lens = [54, 1000, 1]
    pool, tables, q = build_batch(layout, seq_lens, [1] * 3, hq, dt, gen)
    tables_d, qd = tables.to(DEV), q.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    direct = torch.full((3, hq, d), float("nan"), dtype=dt, device=DEV)
    _decode_direct(make_cfg(layout, hq, dt, None), qd, pool, tables_d, lens_d, max(seq_lens),
                   direct)
    via_ops = ops.paged_attention(qd, pool, layout, tables_d, lens_d, max_seq_len=max(seq_lens))
    torch.cuda.synchronize()
    assert torch.equal(via_ops, direct), "ops.paged_attention did not run the decode kernel"
    ref = reference.paged_attention(qd.float(), pool, layout, tables_d, lens_d.cpu(), None, None)
    check_close(direct, ref, dt, "int8 decode (direct)", unit=torch.bfloat16)
    out = torch.empty_like(direct)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(ops.paged_attention(qd, pool, layout, tables_d, lens_d,
                                      max_seq_len=max(seq_lens)))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, direct), "graph replay of int8 decode differs"


@pytest.mark.parametrize("policy", ["int4-bdr:h=64,kv,seed=11", "bf16", "int4", "int8"])
@pytest.mark.parametrize("decode", [False, True])
def test_attention_step_fused(policy, decode):
    """Slots from the block tables + write + attention in one call, vs reference write and
    reference attention; the pools must be byte-identical."""
    dt, d, hkv, group, page = torch.bfloat16, 128, 2, 4, 32
    hq = hkv * group
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    gen = _gen(31 + decode)
    seq_lens = [1, 54, 97, 200] if decode else [54, 97, 1, 200]
    q_lens = [1] * 4 if decode else [54, 40, 1, 7]
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=False)
    ref_pool = pool.clone()
    n = sum(q_lens)
    q = torch.randn(n, hq, d, generator=gen)
    k = outlier_heads(n, hkv, d, gen, 2.0)
    v = torch.randn(n, hkv, d, generator=gen) * 2
    qkv = torch.cat([q, k, v], 1).reshape(n, -1).to(dt).to(DEV)
    signs = _signs_buf(layout)
    cfg = make_cfg(layout, hq, dt, signs)
    tables_d = tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEV)
    out = torch.full((n, hq * d), float("nan"), dtype=dt, device=DEV)
    ws_bytes = capi.workspace_bytes(cfg, 4, n, max(seq_lens))
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=DEV)
    try:
        capi.attention_step_ptr(cfg, qkv.data_ptr(), qkv.stride(0), pool.data_ptr(),
                                tables_d.data_ptr(), tables.shape[1], lens_d.data_ptr(),
                                cu.data_ptr(), 4, n, max(q_lens), max(seq_lens), out.data_ptr(),
                                ws.data_ptr(), ws_bytes, _stream())
    except library.SawKernelError as e:
        if e.code == library.ERR_UNSUPPORTED and layout.policy.kind not in _DECODE_KINDS:
            pytest.skip(f"decode kernel: {e.message}")
        raise
    torch.cuda.synchronize()
    slots = ops.step_slots(layout, tables_d, lens_d.cpu(), cu.cpu(), n)
    kq = qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d)
    vq = qkv[:, (hq + hkv) * d:].reshape(n, hkv, d)
    # the spec's reference is the CPU one: torch's CUDA x / 15 is x * (1/15), not IEEE division
    ref_pool = ref_pool.cpu()
    kv_cache.write_kv(ref_pool, layout, kq.cpu(), vq.cpu(), slots.cpu())
    assert torch.equal(pool.cpu(), ref_pool), "fused write disagrees with the reference write"
    ref = reference.paged_attention(qkv[:, :hq * d].reshape(n, hq, d).float(), pool, layout,
                                    tables_d, lens_d.cpu(), torch.tensor(q_lens), None,
                                    query_operand=reference.kernel_query_operand(q_lens))
    check_close(out.reshape(n, hq, d), ref, dt, f"step {policy} decode={decode}",
                unit=torch.bfloat16 if decode else None)


def test_ops_under_cuda_graph():
    """ops.attention_step captured in a CUDA graph and replayed on new data (no host syncs)."""
    dt, d, hkv, hq, page = torch.float16, 64, 2, 8, 16
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32,seed=3"), d, hkv, page)
    gen = _gen(77)
    seq_lens, q_lens = [40, 97], [40, 20]
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=False)
    n = sum(q_lens)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dt).to(DEV)
    tables_d = tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, 40, 60], dtype=torch.int32, device=DEV)
    out = torch.empty(n, hq * d, dtype=dt, device=DEV)
    args = (pool, layout, hq, tables_d, lens_d, cu, max(q_lens), max(seq_lens))
    ops.attention_step(qkv, *args, out=out)          # warm-up allocates the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.attention_step(qkv, *args, out=out)
    qkv.copy_(torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dt))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.paged_attention(qkv[:, :hq * d].reshape(n, hq, d).float(), pool, layout,
                                    tables_d, lens_d.cpu(), torch.tensor(q_lens), None,
                                    query_operand=reference.kernel_query_operand(q_lens))
    check_close(out.reshape(n, hq, d), ref, dt, "graph replay")


def test_ops_dispatch_to_kernels():
    """ops.write_kv / ops.paged_attention on CUDA tensors go through the library and agree with
    the reference path."""
    assert ops.available()
    dt, d, hkv, hq, page = torch.bfloat16, 128, 2, 8, 64
    layout = PageLayout(KVPolicy.parse("int4-bdr"), d, hkv, page)
    gen = _gen(5)
    t = 150
    k = outlier_heads(t, hkv, d, gen).to(dt).to(DEV)
    v = torch.randn(t, hkv, d, generator=gen).to(dt).to(DEV)
    slots = torch.arange(t, device=DEV)
    pool = kv_cache.new_pool(layout, 1, 4, DEV)[0]
    ref_pool = pool.cpu()
    ops.write_kv(pool, layout, k, v, slots)
    kv_cache.write_kv(ref_pool, layout, k.cpu(), v.cpu(), slots.cpu())
    assert torch.equal(pool.cpu(), ref_pool)
    tables = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([t], dtype=torch.int32, device=DEV)
    q = torch.randn(30, hq, d, generator=gen).to(dt).to(DEV)
    out = ops.paged_attention(q, pool, layout, tables, lens, torch.tensor([30]))
    ref = reference.paged_attention(q.float(), pool, layout, tables, lens.cpu(), torch.tensor([30]),
                                    query_operand=torch.float16)
    check_close(out, ref, dt, "ops.paged_attention")


def test_custom_op_matches_direct_call():
    """torch.ops.sawtrt.attention_step runs the same kernels as ops.attention_step."""
    assert ops.CUSTOM_OPS
    dt, d, hkv, hq, page = torch.bfloat16, 128, 2, 8, 16
    layout = PageLayout(KVPolicy.parse("int4-bdr:h=32,kv"), d, hkv, page)
    gen = _gen(99)
    seq_lens, q_lens = [33, 70], [33, 9]
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=False)
    pool2 = pool.clone()
    n = sum(q_lens)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dt).to(DEV)
    tables_d = tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, 33, 42], dtype=torch.int32, device=DEV)
    a = ops.attention_step(qkv, pool, layout, hq, tables_d, lens_d, cu, 33, 70)
    b = torch.ops.sawtrt.attention_step(qkv, pool2, tables_d, lens_d, cu, layout.to_json(), hq,
                                        33, 70, 1 / math.sqrt(d))
    assert torch.equal(pool, pool2) and torch.equal(a, b)
    ref = reference.paged_attention(qkv[:, :hq * d].reshape(n, hq, d).float(), pool, layout,
                                    tables_d, lens_d.cpu(), torch.tensor(q_lens), None,
                                    query_operand=reference.kernel_query_operand(q_lens))
    check_close(b.reshape(n, hq, d), ref, dt, "custom op")


def test_graph_replay_after_workspace_growth():
    """A decode step captured in a CUDA graph keeps working after a later, larger step grew the
    shared workspace and the allocator released its free memory (the runtime captures decode
    graphs first and runs big prefill steps later). Regression: the outgrown buffer used to be
    freed, and replays wrote to released memory (illegal address at 256 x 8K tokens)."""
    dt, d, hkv, hq, page = torch.bfloat16, 128, 2, 8, 16
    layout = PageLayout(KVPolicy.parse("int4-bdr"), d, hkv, page)
    gen = _gen(91)
    seq_lens, q_lens = [33, 70, 129], [1, 1, 1]
    pool, tables, _ = build_batch(layout, seq_lens, q_lens, hq, dt, gen, prefill_cache=False)
    n = len(seq_lens)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dt).to(DEV)
    tables_d = tables.to(DEV)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    cu = torch.arange(n + 1, dtype=torch.int32, device=DEV)
    out = torch.empty(n, hq * d, dtype=dt, device=DEV)
    args = (pool, layout, hq, tables_d, lens_d, cu, 1, max(seq_lens))
    idx = torch.cuda.current_device()       # a fresh 32 MB buffer: its own allocator segment,
    if idx in ops._workspaces:              # which empty_cache() returns to the driver if freed
        ops._outgrown.append(ops._workspaces.pop(idx))   # (graphs of earlier tests keep theirs)
    ops._workspace(DEV, 32 << 20)
    ops.attention_step(qkv, *args, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.attention_step(qkv, *args, out=out)
    before = ops._workspace(DEV, 0)
    ops._workspace(DEV, before.numel() * 4 + (64 << 20))      # what a big prefill step does
    assert ops._workspace(DEV, 0).data_ptr() != before.data_ptr()
    del before
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.paged_attention(qkv[:, :hq * d].reshape(n, hq, d).float(), pool, layout,
                                    tables_d, lens_d.cpu(), None, None)
    check_close(out.reshape(n, hq, d), ref, dt, "graph replay after workspace growth",
                unit=torch.bfloat16)
