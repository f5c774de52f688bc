"""Prefill attention benchmark: the fresh-K/V dense path (ops.attention_step with a plan: write
K/V into pages, dequantize the cached prefix, one tensor-core attention call) and the
quantized-read INT4 prefill kernel, over bf16 / int4 / int4-bdr caches, against dense BF16
attention on contiguous K/V measured in the same process.

    python -m sawtrt.bench.prefill [--lib build/final/libsawtrt_kernels.so] [--json out.json]

Points are (sequences, new tokens, tokens in the cache incl. the new ones) at qwen3-4b's shape:
1 x 8192/8192 and 4 x 2048/2048 are fresh prompts, 1 x 2048/10240 a 2 048-token chunk over
8 192 cached tokens. Columns (ms):
  fresh <policy>  the runtime's step (write + attend) with the fresh semantics, default backend
  cache-read      the INT4 prefill kernel alone (every position read from the cache)
  dense           the dense BF16 yardstick: cuDNN causal SDPA for fresh prompts; for chunks the
                  faster of flash varlen (bottom-right causal, exact) and cuDNN non-causal
                  over all keys (more work than the mask needs)
  gather          saw_gather_kv alone for the prefix (int4-bdr), with its GB/s
TFLOP/s counts the causal work only (QK^T and PV, 4 D flops per query-key pair per query head).
"""
from __future__ import annotations

import argparse
import json

from .kernels import POLICIES, SHAPES, _l2_flush_buffer, random_pool, time_ms

POINTS = ((1, 8192, 8192), (4, 2048, 2048), (1, 2048, 10240), (16, 512, 512))
WRITE_MODES = {"overlap-write": True, "serial-write": False}   # --backends: auto + write order
COPY_TBPS = 4.24      # measured H200 copy bandwidth (read + write), the gather's ceiling


def causal_flops(batch: int, q_len: int, seq_len: int, hq: int, d: int) -> float:
    start = seq_len - q_len  # query i sees start + i + 1 keys
    pairs = q_len * start + q_len * (q_len + 1) / 2
    return 4.0 * d * hq * batch * pairs


def bench_point(torch, shape, batch, q_len, seq_len, page_size, reps, flush, gen,
                backends=("auto",)) -> dict:
    from ..kernels import capi, dense_prefill, ops
    from ..spec import KVPolicy, PageLayout
    hq, hkv, d = SHAPES[shape]
    dev = "cuda"
    n = batch * q_len
    qkv = torch.randn(n, (hq + 2 * hkv) * d, device=dev, generator=gen).to(torch.bfloat16)
    pages_per = -(-seq_len // page_size)
    bt = torch.randperm(batch * pages_per, device=dev, generator=gen).to(torch.int32)
    bt = bt.view(batch, pages_per)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    cu = torch.arange(0, n + 1, q_len, dtype=torch.int32, device=dev)
    pos = torch.arange(seq_len - q_len, seq_len, device=dev)
    slots = (bt[:, pos // page_size].long() * page_size + pos % page_size).reshape(-1)
    plan = dense_prefill.PrefillPlan.build([q_len] * batch, [seq_len] * batch, slots.cpu(), dev)
    flops = causal_flops(batch, q_len, seq_len, hq, d)
    row = {"shape": shape, "batch": batch, "q_len": q_len, "seq_len": seq_len, "ms": {},
           "backend": {}}
    for policy in POLICIES:
        layout = PageLayout(KVPolicy.parse(policy), d, hkv, page_size)
        pool = random_pool(torch, layout, batch * pages_per, gen)
        for be in backends:
            key = f"fresh {policy}" + ("" if be == "auto" else f" [{be}]")
            # the page write on a side stream (the default) or first on the current stream
            overlap = WRITE_MODES.get(be, dense_prefill.OVERLAP_WRITE)
            be = "auto" if be in WRITE_MODES else be
            row["backend"][key] = dense_prefill.choose_backend(plan, be)
            default, dense_prefill.OVERLAP_WRITE = dense_prefill.OVERLAP_WRITE, overlap
            try:
                row["ms"][key] = time_ms(torch, lambda: dense_prefill.attention_step(
                    qkv, pool, layout, hq, bt, lens, plan, seq_len, backend=be), reps, flush)
            except RuntimeError as e:
                print(f"  {key}: {type(e).__name__}: {str(e)[:100]}")
            finally:
                dense_prefill.OVERLAP_WRITE = default
        if policy == "int4-bdr" and plan.max_prefix:
            cfg = ops.kernel_config(layout, hq, torch.bfloat16, torch.device(dev))
            tables = bt

            def gather():
                dense_prefill.gather_prefix(pool, layout, cfg, tables, plan.prefix_lens,
                                            plan.cu_prefix[:-1], plan.total_prefix,
                                            plan.max_prefix, torch.bfloat16)
            row["ms"]["gather"] = time_ms(torch, gather, reps, flush)
            moved = batch * (seq_len - q_len) * hkv * 2 * (layout.code_bytes + 4 + 2 * d)
            row["gather_tbps"] = moved / (row["ms"]["gather"] * 1e-3) / 1e12
        if policy == "int4-bdr":   # the quantized-read kernel, as before
            cfg = ops.kernel_config(layout, hq, torch.bfloat16, torch.device(dev))
            out = torch.empty(n, hq * d, dtype=torch.bfloat16, device=dev)
            ws_bytes = capi.workspace_bytes(cfg, batch, n, seq_len)
            ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
            row["ms"]["cache-read int4-bdr"] = time_ms(torch, lambda: capi.prefill_ptr(
                cfg, qkv.data_ptr(), qkv.stride(0), pool.data_ptr(), bt.data_ptr(), pages_per,
                lens.data_ptr(), cu.data_ptr(), batch, n, q_len, seq_len, out.data_ptr(),
                ws.data_ptr(), ws_bytes, torch.cuda.current_stream().cuda_stream), reps, flush)
            del out, ws
        del pool
    # dense BF16 yardsticks on contiguous K/V of all seq_len keys
    q = qkv[:, :hq * d].reshape(n, hq, d).contiguous()
    k = torch.randn(batch * seq_len, hkv, d, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn_like(k)
    cu_k = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    dense = {}
    try:
        dense["flash-varlen"] = time_ms(torch, lambda: dense_prefill.flash_varlen(
            q, k, v, cu, cu_k, q_len, seq_len, scale), reps, flush)
    except Exception as e:  # noqa: BLE001
        print(f"  flash-varlen: {type(e).__name__}: {str(e)[:100]}")
    q4 = q.view(batch, q_len, hq, d).transpose(1, 2)
    k4 = k.view(batch, seq_len, hkv, d).transpose(1, 2)
    v4 = v.view(batch, seq_len, hkv, d).transpose(1, 2)
    causal = q_len == seq_len   # SDPA's is_causal is top-left aligned: causal only when equal
    name = "cudnn" if causal else "cudnn-full"
    try:
        dense[name] = time_ms(torch, lambda: dense_prefill._sdpa_cudnn_4d(
            q4, k4, v4, causal, scale), reps, flush)
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: {type(e).__name__}: {str(e)[:100]}")
    for key, ms in dense.items():
        row["ms"][f"dense {key}"] = ms
    if dense:
        best = min(dense, key=dense.get)
        row["dense"] = best
        row["ms"]["dense"] = dense[best]
    row["tflops"] = {k: flops / (ms * 1e-3) / 1e12 for k, ms in row["ms"].items()}
    return row


def bench_serving_step(torch, shape, budget, page_size, reps, gen,
                       backends=("flash", "cudnn-seq", "auto")) -> dict:
    """The chunked-prefill serving step: the tail of one prompt (its first budget - tail tokens
    cached) and the head of the next, budget new tokens in all, int4-bdr pages. The tail length
    changes every rep (as it does from step to step in serving), so a backend's per-shape
    set-up (cuDNN's graph build) is inside the timing (auto: the head padded to a bucket whose
    plan the first rep, not timed, built). Returns ms per backend (median)."""
    import statistics

    from ..kernels import dense_prefill
    from ..spec import KVPolicy, PageLayout
    hq, hkv, d = SHAPES[shape]
    dev = "cuda"
    layout = PageLayout(KVPolicy.parse("int4-bdr"), d, hkv, page_size)
    pages = 2 * (-(-budget // page_size))
    pool = random_pool(torch, layout, pages, gen)
    bt = torch.randperm(pages, device=dev, generator=gen).to(torch.int32).view(2, -1)
    qkv = torch.randn(budget, (hq + 2 * hkv) * d, device=dev, generator=gen).to(torch.bfloat16)
    out = {}
    for be in backends:
        times = []
        for r in range(reps + 1):
            tail = 61 + 7 * r + 3 * len(out)       # a shape this process has not seen yet
            q_lens, seq_lens = [tail, budget - tail], [budget, budget - tail]
            tail_pos = torch.arange(budget - tail, budget, device=dev)
            head_pos = torch.arange(budget - tail, device=dev)
            slots = torch.cat((bt[0, tail_pos // page_size].long() * page_size
                               + tail_pos % page_size,
                               bt[1, head_pos // page_size].long() * page_size
                               + head_pos % page_size))
            plan = dense_prefill.PrefillPlan.build(q_lens, seq_lens, slots.cpu(), dev)
            lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dense_prefill.attention_step(qkv, pool, layout, hq, bt, lens, plan, budget,
                                         backend=be)
            e1.record()
            torch.cuda.synchronize()
            if r:                                  # rep 0: the backend's first call ever
                times.append(e0.elapsed_time(e1))
        out[be] = statistics.median(times)
    return {"budget": budget, "ms": out}


def format_row(r: dict) -> str:
    ms = r["ms"]
    nan = float("nan")
    f = lambda k: f"{ms[k]:7.3f}" if k in ms else f"{'-':>7s}"  # noqa: E731
    dense = ms.get("dense", nan)
    bdr = ms.get("fresh int4-bdr", nan)
    return (f"{r['batch']:>3} x {r['q_len']:>5}/{r['seq_len']:<5} | {f('fresh bf16')} | "
            f"{f('fresh int4')} | {f('fresh int4-bdr')} | {f('cache-read int4-bdr')} | "
            f"{f('dense')} {r.get('dense', '-'):>12s} | {f('gather')} | "
            f"{bdr / dense:7.3f} | {bdr / ms.get('fresh int4', nan):7.3f} | "
            f"{ms.get('cache-read int4-bdr', nan) / bdr:7.2f}")


HEADER = (f"{'B x new/ctx':>16} | {'fresh':>7} | {'fresh':>7} | {'fresh':>7} | {'cache-rd':>7} | "
          f"{'dense bf16':>20} | {'gather':>7} | {'bdr /':>7} | {'bdr /':>7} | {'speedup':>7}\n"
          f"{'':>16} | {'bf16':>7} | {'int4':>7} | {'int4-bdr':>7} | {'int4-bdr':>7} | "
          f"{'ms':>7} {'(best)':>12} | {'ms':>7} | {'dense':>7} | {'int4':>7} | "
          f"{'vs cache':>7}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=None, help="kernel library (default: the usual search)")
    ap.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backends", default="auto",
                    help="comma list of dense backends to time (auto, flash, cudnn, cudnn-split; "
                         "overlap-write / serial-write: auto with the page write on a side "
                         "stream (the default) / first on the current stream)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from ..kernels import library
    if args.lib:
        library.load(args.lib)
    gen = torch.Generator(device="cuda").manual_seed(0)
    flush = _l2_flush_buffer(torch)
    backends = tuple(args.backends.split(","))
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, shape {args.shape}, "
          f"page {args.page_size}; ms, median of {args.reps}")
    print(HEADER, flush=True)
    for batch, q_len, seq_len in POINTS:
        r = bench_point(torch, args.shape, batch, q_len, seq_len, args.page_size, args.reps,
                        flush, gen, backends)
        rows.append(r)
        print(format_row(r), flush=True)
    print("\nper point, every timing (ms / causal TFLOP/s) and the backend each fresh column ran:")
    for r in rows:
        cells = ", ".join(f"{k} {ms:.3f}/{r['tflops'][k]:.0f}T" for k, ms in r["ms"].items())
        cells += "; int4-bdr / int4: " + ", ".join(   # per backend (the 2 % goal)
            f"{be} {r['ms'][f'fresh int4-bdr{sfx}'] / r['ms'][f'fresh int4{sfx}']:.3f}"
            for be in backends for sfx in ["" if be == "auto" else f" [{be}]"]
            if f"fresh int4-bdr{sfx}" in r["ms"] and f"fresh int4{sfx}" in r["ms"])
        print(f"  {r['batch']} x {r['q_len']}/{r['seq_len']}: {cells}; backends {r['backend']}"
              + (f"; gather {r['gather_tbps']:.2f} TB/s = {r['gather_tbps'] / COPY_TBPS:.0%} "
                 f"of copy" if "gather_tbps" in r else ""))
    step = bench_serving_step(torch, args.shape, 8192, args.page_size, args.reps, gen)
    print("\nserving step (a prompt's tail chunk + the next prompt's head, 8 192 new tokens, "
          "int4-bdr, a new tail length every rep): " +
          ", ".join(f"{be} {ms:.3f} ms" for be, ms in step["ms"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "serving_step": step, "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
