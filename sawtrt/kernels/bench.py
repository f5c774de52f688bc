"""Benchmark of the write and prefill kernels (decode lives in sawtrt/bench/).

    python -m sawtrt.kernels.bench [--json out.json] [--quick]

Prints median times (CUDA events; the write kernel inside a CUDA graph of 20 launches over 4
rotating input sets, as the runtime runs it; prefill launched directly) and, per row: write —
bytes moved (activations read + cache written) and GB/s; prefill — TFLOP/s (4 * Hq * D * causal pairs) and, for a fresh prompt, the
time of torch SDPA (flash / cuDNN, bf16, dense causal) on the same shape as the baseline.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from .. import kv_cache
from ..spec import KVPolicy, PageLayout
from . import capi, library, ops


def _time(fn, iters=50, warmup=5) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _time_graph(fn, reps=20) -> float:
    """Median ms of one fn() replayed inside a CUDA graph of `reps` calls: small kernels are
    timed without the Python/ctypes launch overhead (how the runtime runs them)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return _time(graph.replay, iters=30) / reps


def _cfg(layout, hq, dt):
    signs = layout.policy.signs(layout.head_dim)
    signs = None if signs is None else signs.cuda()
    return library.make_config(layout, hq, dt, signs_ptr=0 if signs is None else
                               signs.data_ptr()), signs


def bench_write(hq, hkv, d, tokens, policy, dt=torch.bfloat16, page=64):
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    cfg, _keep = _cfg(layout, hq, dt)
    sets = 4
    qkv = [torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda", dtype=dt) for _ in range(sets)]
    npages = (tokens + page - 1) // page
    pool = kv_cache.new_pool(layout, 1, npages * sets)[0].cuda()
    slots = [torch.arange(tokens, device="cuda", dtype=torch.int32) + i * npages * page
             for i in range(sets)]
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % sets
        capi.write_kv_ptr(cfg, qkv[i].data_ptr(), qkv[i].stride(0), slots[i].data_ptr(), tokens,
                          pool.data_ptr(), torch.cuda.current_stream().cuda_stream)
    ms = _time_graph(run)
    nbytes = tokens * hkv * (2 * d * qkv[0].element_size() + layout.token_bytes)
    return {"op": "write", "policy": policy, "Hq": hq, "Hkv": hkv, "D": d, "tokens": tokens,
            "ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6}


def bench_prefill(hq, hkv, d, batch, seq, qlen, policy, dt=torch.bfloat16, page=64):
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    cfg, _keep = _cfg(layout, hq, dt)
    pages = (seq + page - 1) // page
    pool = kv_cache.new_pool(layout, 1, batch * pages)[0].cuda()
    pool.random_(0, 256)
    if layout.policy.quantized:   # keep (scale, offset) finite: small positive scales
        view = pool.view(batch * pages, hkv, -1)
        for at in (layout.k_params, layout.v_params):
            params = view[:, :, at:at + page * 4].view(torch.float16)
            params[..., 0::2] = 0.01
            params[..., 1::2] = -0.08
    else:
        pool.view(torch.bfloat16).normal_()
    perm = torch.randperm(batch * pages, device="cuda").int()
    tables = perm.view(batch, pages).contiguous()
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * qlen
    q = torch.randn(batch * qlen, hq, d, device="cuda", dtype=dt)
    out = torch.empty_like(q)
    stream = torch.cuda.current_stream().cuda_stream
    ws_bytes = capi.workspace_bytes(cfg, batch, batch * qlen, seq)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")

    def run():
        capi.prefill_ptr(cfg, q.data_ptr(), q.stride(0), pool.data_ptr(), tables.data_ptr(),
                         pages, lens.data_ptr(), cu.data_ptr(), batch, batch * qlen, qlen, seq,
                         out.data_ptr(), ws.data_ptr(), ws_bytes, stream)
    ms = _time(run, iters=20)
    pairs = batch * (qlen * (seq - qlen) + qlen * (qlen + 1) / 2)
    flops = 4 * hq * d * pairs
    row = {"op": "prefill", "policy": policy, "Hq": hq, "Hkv": hkv, "D": d, "batch": batch,
           "seq": seq, "q_len": qlen, "ms": ms, "TFLOPs": flops / ms / 1e9}
    if qlen == seq:   # fresh prompt: dense causal SDPA baseline on the same shape
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qq = torch.randn(batch, hq, seq, d, device="cuda", dtype=dt)
        kk = torch.randn(batch, hkv, seq, d, device="cuda", dtype=dt)
        vv = torch.randn_like(kk)
        best = math.inf
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    t = _time(lambda: torch.nn.functional.scaled_dot_product_attention(
                        qq, kk, vv, is_causal=True, enable_gqa=True), iters=20)
                row[f"sdpa_{backend.name.lower()}_ms"] = t
                best = min(best, t)
            except RuntimeError:
                pass
        row["sdpa_best_ms"] = best
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    assert ops.available(), "needs a GPU and libsawtrt_kernels.so"
    rows = []
    for tokens in (1, 32, 128, 4096):
        for policy in ("bf16", "int4", "int4-bdr"):
            rows.append(bench_write(32, 8, 128, tokens, policy))
    shapes = [(32, 8, 128)] + ([] if args.quick else [(16, 4, 64), (8, 2, 256)])
    for hq, hkv, d in shapes:
        for batch, seq, qlen in ((1, 4096, 4096), (4, 4096, 512), (1, 16384, 2048)):
            for policy in ("bf16", "int4", "int4-bdr"):
                rows.append(bench_prefill(hq, hkv, d, batch, seq, qlen, policy))
    print(f"{'op':8}{'policy':10}{'shape':>28}{'ms':>10}{'GB/s|TFLOP/s':>14}{'sdpa ms':>10}")
    for r in rows:
        if r["op"] == "write":
            shape = f"{r['Hq']}/{r['Hkv']}x{r['D']} T={r['tokens']}"
            print(f"{'write':8}{r['policy']:10}{shape:>28}{r['ms']:10.4f}{r['GBps']:14.1f}")
        else:
            shape = f"{r['Hq']}/{r['Hkv']}x{r['D']} {r['batch']}x{r['seq']} q{r['q_len']}"
            sd = r.get("sdpa_best_ms")
            print(f"{'prefill':8}{r['policy']:10}{shape:>28}{r['ms']:10.3f}{r['TFLOPs']:14.1f}"
                  f"{'' if sd is None else f'{sd:10.3f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
