"""Prefill kernel benchmark: our paged causal prefill over bf16 / int4 / int4-bdr caches, with
PyTorch's causal BF16 SDPA (flash / cuDNN, the faster) on a contiguous cache as the yardstick.

    python -m sawtrt.bench.prefill [--lib build/final/libsawtrt_kernels.so] [--json out.json]

Points are (sequences, new tokens, cached tokens incl. the new ones) at qwen3-4b's shape; the
serving benchmark's chunks are 8 192 tokens, so 1 x 8192/8192 is one whole prompt and
1 x 2048/8192 the last chunk of a chunked one. TFLOP/s counts the causal work only
(QK^T and PV, 4 D flops per query-key pair per query head). Timing as in bench.kernels.
"""
from __future__ import annotations

import argparse
import json

from .kernels import POLICIES, SHAPES, _l2_flush_buffer, random_pool, time_ms

POINTS = ((1, 8192, 8192), (1, 2048, 8192), (4, 2048, 2048), (16, 512, 512))


def causal_flops(batch: int, q_len: int, seq_len: int, hq: int, d: int) -> float:
    start = seq_len - q_len  # query i sees start + i + 1 keys
    pairs = q_len * start + q_len * (q_len + 1) / 2
    return 4.0 * d * hq * batch * pairs


def bench_point(torch, shape, batch, q_len, seq_len, page_size, reps, flush, gen) -> dict:
    from ..kernels import capi, library
    from ..spec import KVPolicy, PageLayout
    hq, hkv, d = SHAPES[shape]
    dev = "cuda"
    n = batch * q_len
    q = torch.randn(n, hq * d, device=dev, generator=gen).to(torch.bfloat16)
    pages_per = -(-seq_len // page_size)
    bt = torch.randperm(batch * pages_per, device=dev, generator=gen).to(torch.int32)
    bt = bt.view(batch, pages_per)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    cu = torch.arange(0, n + 1, q_len, dtype=torch.int32, device=dev)
    flops = causal_flops(batch, q_len, seq_len, hq, d)
    row = {"shape": shape, "batch": batch, "q_len": q_len, "seq_len": seq_len, "ms": {},
           "tflops": {}}
    for policy in POLICIES:
        layout = PageLayout(KVPolicy.parse(policy), d, hkv, page_size)
        pool = random_pool(torch, layout, batch * pages_per, gen)
        signs = layout.policy.signs(d)
        signs = signs.to(dev) if signs is not None else None
        cfg = library.make_config(layout, hq, torch.bfloat16,
                                  signs_ptr=0 if signs is None else signs.data_ptr())
        out = torch.empty(n, hq * d, dtype=torch.bfloat16, device=dev)
        ws_bytes = capi.workspace_bytes(cfg, batch, n, seq_len)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)

        def run():
            capi.prefill_ptr(cfg, q.data_ptr(), q.stride(0), pool.data_ptr(), bt.data_ptr(),
                             pages_per, lens.data_ptr(), cu.data_ptr(), batch, n, q_len,
                             seq_len, out.data_ptr(), ws.data_ptr(), ws_bytes,
                             torch.cuda.current_stream().cuda_stream)
        row["ms"][policy] = time_ms(torch, run, reps, flush)
        del pool, out, ws
    if q_len == seq_len:  # SDPA's causal mask is top-left aligned: only whole prompts compare
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
        q4 = q.view(batch, q_len, hq, d).transpose(1, 2)
        k = torch.randn(batch, hkv, seq_len, d, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            def sdpa():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q4, k, v, is_causal=True,
                                                          enable_gqa=True)
            try:
                row["ms"][name] = time_ms(torch, sdpa, reps, flush)
            except Exception as e:  # backend refuses this shape
                print(f"  {name}: {type(e).__name__}: {str(e)[:80]}")
    row["tflops"] = {k: flops / (ms * 1e-3) / 1e12 for k, ms in row["ms"].items()}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=None, help="kernel library (default: the usual search)")
    ap.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from ..kernels import library
    if args.lib:
        library.load(args.lib)
    gen = torch.Generator(device="cuda").manual_seed(0)
    flush = _l2_flush_buffer(torch)
    rows = []
    keys = list(POLICIES) + ["sdpa-cudnn", "sdpa-flash"]
    print(f"{'B x new/ctx':>16} | " + " | ".join(f"{k:>17}" for k in keys)
          + " | bdr/int4 | bdr/bf16   (ms, TFLOP/s)")
    for batch, q_len, seq_len in POINTS:
        r = bench_point(torch, args.shape, batch, q_len, seq_len, args.page_size, args.reps,
                        flush, gen)
        rows.append(r)
        cells = [f"{r['ms'][k]:7.2f} {r['tflops'][k]:5.0f}T" if k in r["ms"] else " " * 17
                 for k in keys]
        ms = r["ms"]
        print(f"{batch:>3} x {q_len:>5}/{seq_len:<5} | " + " | ".join(cells)
              + f" | {ms['int4'] / ms['int4-bdr']:8.3f} | {ms['bf16'] / ms['int4-bdr']:8.3f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "gpu": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
