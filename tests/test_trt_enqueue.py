"""The SawAttention enqueue path on a GPU, without TensorRT: `core.enqueue` is what
`SawAttention.enqueue` calls, with the same arguments TensorRT passes (tensor descriptions with
.dims/.type, device addresses, workspace address, stream handle). Inputs are torch CUDA tensors;
the result is compared with the PyTorch reference (write-then-attend over the paged cache) and
with sawtrt.kernels.ops on the same tensors.

Needs a CUDA GPU and the compiled kernel library (build/libsawtrt_kernels.so via
`python build_scripts/build.py --dev`); no numpy, no TensorRT."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sawtrt import kv_cache, reference
from sawtrt.spec import KVPolicy, PageLayout
from sawtrt.trt import core, golden
from sawtrt.trt.params import AttentionParams

def _library_or_skip():
    from sawtrt.kernels import library
    if library.try_load() is None:
        pytest.skip("kernel library not built (python build_scripts/build.py --dev)")


def desc(t: torch.Tensor):
    """What TensorRT hands enqueue for one tensor: dims and a DataType (by name)."""
    name = {torch.float16: "HALF", torch.bfloat16: "BF16", torch.int32: "INT32",
            torch.uint8: "UINT8", torch.float32: "FLOAT"}[t.dtype]
    return SimpleNamespace(dims=tuple(t.shape), type=core.DT[name], format="LINEAR")


def make_case(policy: str, dtype, prefix, new, hq=8, hkv=2, d=128, page=16, seed=0):
    """A mixed batch: sequence b has prefix[b] tokens cached and new[b] new ones."""
    gen = torch.Generator().manual_seed(seed)
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    total = [p + n for p, n in zip(prefix, new)]
    max_pages = max(-(-t // page) for t in total)
    num_pages = sum(-(-t // page) for t in total) + 3
    perm = torch.randperm(num_pages, generator=gen).tolist()       # scattered pages
    tables = torch.zeros(len(total), max_pages, dtype=torch.int32)
    for b, t in enumerate(total):
        n = -(-t // page)
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    pool = kv_cache.new_pool(layout, 1, num_pages)[0]
    for b, p in enumerate(prefix):                                  # cached prefix (reference)
        if p:
            k = torch.randn(p, hkv, d, generator=gen)
            v = torch.randn(p, hkv, d, generator=gen)
            pos = torch.arange(p)
            slots = tables[b, pos // page].long() * page + pos % page
            kv_cache.write_kv(pool, layout, k, v, slots)
    T = sum(new)
    qkv = (torch.randn(T, (hq + 2 * hkv) * d, generator=gen) * 2).to(dtype)
    seq_lens = torch.tensor(total, dtype=torch.int32)
    q_lens = torch.tensor(new, dtype=torch.int32)
    cu = torch.zeros(len(new) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_lens, 0)
    return layout, pool, tables, seq_lens, q_lens, cu, qkv


def reference_step(params, pool, tables, seq_lens, cu, qkv):
    """The plugin's golden reference on CPU copies. Returns (out fp32, pool after the write)."""
    pool = pool.clone()
    out = golden.sawattention(params, qkv.float(), pool, tables, seq_lens, cu)
    return out.float(), pool


CASES = [
    # policy, dtype, cached prefix per sequence, new tokens per sequence
    ("int4-bdr", torch.float16, [0, 37, 96], [54, 1, 1]),            # prefill + decode mixed
    ("int4-bdr", torch.bfloat16, [5, 15, 16, 63], [1, 1, 1, 1]),     # decode only (T == B)
    ("int4-bdr", torch.bfloat16, [0, 0], [77, 8]),                   # T - B + 1 > max_seq_len'
    ("int4-bdr:h=64,kv,seed=3", torch.float16, [0, 20], [97, 12]),   # signs, V rotated, chunks
    ("int4", torch.bfloat16, [31, 0], [1, 17]),
    ("int8", torch.float16, [3], [1]),
    ("bf16", torch.bfloat16, [0, 40], [16, 1]),
]


def assert_within(got, ref, eps, k_max, k_fro):
    """|got - ref| <= k_max * eps * max|ref row| elementwise, ||got - ref|| <= k_fro * eps * ||ref||."""
    row = ref.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    err = (got - ref).abs()
    assert (err <= k_max * eps * row).all(), f"max err / row max {(err / row).max():.3g}"
    assert err.norm() <= k_fro * eps * ref.norm() + 1e-6, \
        f"relative error {err.norm() / ref.norm():.3g} > {k_fro} eps"


def run_case(policy, dtype, prefix, new, dev, launch):
    """Drive core.enqueue through `launch` on `dev` and check it against the references."""
    hq = 8
    layout, pool, tables, seq_lens, q_lens, cu, qkv = make_case(policy, dtype, prefix, new, hq=hq)
    params = AttentionParams.from_layout(hq, layout, layer_index=3, max_seq_len=512,
                                         max_batch=8)
    ref_out, ref_pool = reference_step(params, pool, tables, seq_lens, cu, qkv)
    g = {n: t.to(dev) for n, t in dict(qkv=qkv, pool=pool, tables=tables, seq_lens=seq_lens,
                                       cu=cu).items()}
    out = torch.full((qkv.shape[0], hq * layout.head_dim), float("nan"), dtype=dtype,
                     device=dev)
    inputs = [g["qkv"], g["pool"], g["tables"], g["seq_lens"], g["cu"]]
    max_len = core.StepShape(qkv.shape[0], len(new), tables.shape[1], -1).max_seq_len(params)
    ws_bytes = core.workspace_size(params, len(new), qkv.shape[0], max_len,
                                   core.ACT_TYPES[desc(qkv).type.name])
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    launch(params, [desc(t) for t in inputs], [desc(out)], [t.data_ptr() for t in inputs],
           [out.data_ptr()], workspace.data_ptr(), tensors=inputs + [out])

    got = out.float().cpu()
    assert torch.isfinite(got).all()
    # 1. the K/V the plugin wrote decode to the reference's values (within one code step)
    levels = {"int8": 255, "int4": 15, "int4-bdr": 15}.get(layout.policy.kind)
    for b in range(len(new)):
        L = int(seq_lens[b])
        got_kv = kv_cache.gather_kv(g["pool"].cpu(), layout, tables[b], L)
        ref_kv = kv_cache.gather_kv(ref_pool, layout, tables[b], L)
        for x1, x0 in zip(got_kv, ref_kv):
            if levels:
                step = (x0.amax(-1, keepdim=True) - x0.amin(-1, keepdim=True)) / levels
            else:
                step = x0.abs() * 2 ** -7
            assert ((x1 - x0).abs() <= step * 1.01 + 1e-3).all()
    # 2. attention over the pool the plugin wrote == the reference over that same pool
    same_pool = reference.paged_attention(
        qkv.float()[:, :hq * layout.head_dim].reshape(-1, hq, layout.head_dim),
        g["pool"].cpu(), layout, tables, seq_lens, q_lens, params.scale,
        query_operand=reference.kernel_query_operand(new) if dev.type == "cuda" else None
    ).reshape(got.shape)     # (the CPU stand-in for the C ABI runs the fp32 reference)
    # tolerance as tests/test_kernels_gpu.py states it for these kernels: prefill rounds the
    # rotated query to fp16 (modelled by query_operand), both round p*s_v to the activation type
    # (eps) and the output once more. A decode-only step goes to the decode kernel, whose V MMA
    # takes p in bf16 for every activation type (tests/test_kernels_gpu.py checks it in bf16
    # units too): the fp16 int8 decode case measured 4.4 fp16 units = 0.54 bf16 units
    decode_only = all(n == 1 for n in new)
    eps = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[
        torch.bfloat16 if decode_only else dtype]
    assert_within(got, same_pool, eps, k_max=16, k_fro=4)
    # 3. and the golden reference end to end (its own write, then attend)
    assert_within(got, ref_out, eps, k_max=32, k_fro=8)
    # 4. the same numbers as the torch op that runs the same C ABI (sawtrt.kernels.ops)
    from sawtrt.kernels import ops
    pool2 = pool.to(dev)
    ops_out = ops.attention_step(g["qkv"], pool2, layout, hq, g["tables"], g["seq_lens"], g["cu"],
                                 max_q_len=int(q_lens.max()), max_seq_len=max_len,
                                 sm_scale=params.scale)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(pool2, g["pool"])            # identical K/V bytes
    assert_within(got, ops_out.float().cpu(), eps, k_max=1, k_fro=0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("policy, dtype, prefix, new", CASES)
def test_enqueue_matches_reference_and_ops(policy, dtype, prefix, new):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _library_or_skip()
    stream = torch.cuda.Stream()

    def launch(params, in_desc, out_desc, in_ptrs, out_ptrs, ws_ptr, tensors):
        signs = core.SignsBuffer(params)
        with torch.cuda.stream(stream):
            core.enqueue(params, in_desc, out_desc, in_ptrs, out_ptrs, ws_ptr,
                         stream.cuda_stream, signs_ptr=signs.ptr)
        stream.synchronize()
        assert signs.allocated == params.needs_signs

    run_case(policy, dtype, prefix, new, torch.device("cuda"), launch)


class PointerCapi:
    """CPU stand-in for sawtrt.kernels.capi: maps the addresses enqueue passes back to the torch
    tensors behind them and runs the reference form of the same step (ops.attention_step on CPU
    tensors), after checking every size argument against those tensors."""

    def __init__(self, layout, hq):
        self.layout, self.hq, self.tensors, self.calls = layout, hq, {}, 0

    def workspace_bytes(self, cfg, num_seqs, num_tokens, max_seq_len):
        return 0

    def attention_step_ptr(self, cfg, qkv_ptr, qkv_stride, pool_ptr, bt_ptr, max_pages, sl_ptr,
                           cu_ptr, num_seqs, num_tokens, max_q_len, max_seq_len, out_ptr, ws_ptr,
                           ws_bytes, stream):
        from sawtrt.kernels import library, ops
        lay = self.layout
        t = {k: self.tensors[p] for k, p in dict(qkv=qkv_ptr, pool=pool_ptr, bt=bt_ptr,
                                                 sl=sl_ptr, cu=cu_ptr, out=out_ptr).items()}
        assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size) == \
            (self.hq, lay.num_kv_heads, lay.head_dim, lay.page_size)
        assert cfg.kind == {"bf16": 0, "int8": 1, "int4": 2, "int4-bdr": 2}[lay.policy.kind]
        assert cfg.rotation_block == (lay.policy.rotation_block or 0)
        assert cfg.rotate_v == int(lay.policy.rotate_v)
        assert cfg.act_dtype == library.act_dtype_code(t["qkv"].dtype)
        assert bool(cfg.signs) == (lay.policy.sign_seed is not None)
        assert qkv_stride == t["qkv"].stride(0) and num_tokens == t["qkv"].shape[0]
        assert (num_seqs, max_pages) == tuple(t["bt"].shape) and num_seqs + 1 == len(t["cu"])
        q_lens = t["cu"].diff()
        assert int(q_lens.max()) <= max_q_len and int(t["sl"].max()) <= max_seq_len
        ops.attention_step(t["qkv"], t["pool"], lay, self.hq, t["bt"], t["sl"], t["cu"],
                           max_q_len, max_seq_len, cfg.sm_scale, out=t["out"])
        self.calls += 1


@pytest.mark.parametrize("policy, dtype, prefix, new", [CASES[0], CASES[2]])
def test_enqueue_arguments_reproduce_the_step_on_cpu(monkeypatch, policy, dtype, prefix, new):
    """The pointers and sizes core.enqueue hands the C ABI are enough to compute the right step:
    the same checks as the GPU test, with the C ABI replaced by PointerCapi."""
    fake = {}

    def launch(params, in_desc, out_desc, in_ptrs, out_ptrs, ws_ptr, tensors):
        capi = PointerCapi(params.layout, params.num_q_heads)
        fake["capi"] = capi
        monkeypatch.setattr(core, "_capi", lambda: capi)
        capi.tensors = {t.data_ptr(): t for t in tensors}     # the tensors behind the addresses
        core.enqueue(params, in_desc, out_desc, in_ptrs, out_ptrs, ws_ptr, 0,
                     signs_ptr=0x1234 if params.needs_signs else 0)

    monkeypatch.setattr(core, "workspace_size", lambda *a, **k: 0)
    run_case(policy, dtype, prefix, new, torch.device("cpu"), launch)
    assert fake["capi"].calls == 1
