"""Benchmark of the write kernel (decode: sawtrt.bench.kernels; prefill: sawtrt.bench.prefill,
which replaced this module's prefill rows).

    python -m sawtrt.kernels.bench [--json out.json]

Prints median times (CUDA events; the write kernel inside a CUDA graph of 20 launches over 4
rotating input sets, as the runtime runs it): bytes moved (activations read + cache written) and
GB/s.
"""
from __future__ import annotations

import argparse
import json

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    assert ops.available(), "needs a GPU and libsawtrt_kernels.so"
    rows = []
    for tokens in (1, 32, 128, 4096):
        for policy in ("bf16", "int4", "int4-bdr"):
            rows.append(bench_write(32, 8, 128, tokens, policy))
    print(f"{'op':8}{'policy':10}{'shape':>28}{'ms':>10}{'GB/s':>14}")
    for r in rows:
        shape = f"{r['Hq']}/{r['Hkv']}x{r['D']} T={r['tokens']}"
        print(f"{'write':8}{r['policy']:10}{shape:>28}{r['ms']:10.4f}{r['GBps']:14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
