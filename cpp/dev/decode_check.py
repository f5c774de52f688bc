#!/usr/bin/env python3
"""Sandbox validation of the decode kernel against sawtrt.reference.paged_attention (fp32).

    python cpp/dev/decode_check.py [--lib build/libsawtrt_kernels.so]

Fresh random inputs per case (never zeros), K with outlier channels (20-100x), output poisoned
with NaN before the launch, lengths that are not multiples of the page size, pages in random
order inside a pool with unused (poisoned) pages, mixed lengths in one batch. Prints one line per
case with the relative error ||out - ref|| / ||ref|| and the worst element error; exits 1 when a
case fails (rel > 1e-2, or any non-finite / unwritten output)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from sawtrt import reference  # noqa: E402
from sawtrt.bench.decode_runner import DecodeCall, DecodeLib  # noqa: E402
from sawtrt.kv_cache import write_kv  # noqa: E402
from sawtrt.spec import KVPolicy, PageLayout  # noqa: E402

TOL = 1e-2  # bf16 rounding of P and V (2^-9) plus fp16 q; observed errors sit near 3e-3


def build_case(gen, policy: str, hq: int, hkv: int, d: int, page: int, lens: list[int],
               dtype, outliers: bool = True, device="cuda"):
    layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
    b = len(lens)
    pages_per = [math.ceil(n / page) for n in lens]
    num_pages = sum(pages_per) + 7  # spare pages stay poisoned
    pool = torch.randint(0, 256, (num_pages, hkv, layout.head_block_bytes), generator=gen,
                         dtype=torch.uint8, device="cpu").to(device)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    max_pages = max(pages_per) + 2
    bt = torch.full((b, max_pages), -1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(pages_per):
        bt[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    for i, n in enumerate(lens):  # write each sequence's K/V through the reference writer
        k = torch.randn(n, hkv, d, generator=gen)
        v = torch.randn(n, hkv, d, generator=gen)
        if outliers:
            ch = torch.randint(0, d, (3,), generator=gen)
            k[..., ch] *= torch.tensor([20.0, 50.0, 100.0])
        pos = torch.arange(n)
        slots = bt[i, pos // page].long() * page + pos % page
        write_kv(pool, layout, k.to(device), v.to(device), slots.to(device))
    q = (torch.randn(b, hq, d, generator=gen) * 2).to(dtype).to(device)
    return layout, q, pool, bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


CASES = [
    # policy, Hq, Hkv, D, page, lens, dtype
    ("int4-bdr", 32, 8, 128, 64, [1, 54, 97, 1000, 3001], torch.float16),
    ("int4-bdr", 32, 8, 128, 64, [1, 54, 97, 1000, 3001], torch.bfloat16),
    ("int4", 32, 8, 128, 16, [17, 300, 2049], torch.bfloat16),
    ("bf16", 32, 8, 128, 64, [1, 54, 97, 1000, 3001], torch.bfloat16),
    ("bf16", 32, 8, 128, 32, [33, 700], torch.float16),
    ("int4-bdr:h=32,kv,seed=3", 32, 8, 128, 128, [5, 129, 1500], torch.float16),
    ("int4", 9, 3, 64, 16, [1, 31, 517], torch.bfloat16),
    ("int4-bdr:h=16,kv,seed=7", 9, 3, 64, 32, [2, 65, 900], torch.float16),
    ("bf16", 9, 3, 64, 16, [15, 333], torch.float16),
    ("int4-bdr", 8, 1, 256, 32, [3, 77, 1200], torch.bfloat16),
    ("int4-bdr:h=64,kv,seed=1", 16, 4, 256, 64, [1, 200, 640], torch.float16),
    ("bf16", 8, 1, 256, 64, [9, 500], torch.bfloat16),
    ("int4-bdr:h=32,kv,seed=5", 16, 1, 128, 64, [7, 450], torch.float16),   # group 16
    ("int4", 12, 1, 64, 128, [130, 1000], torch.bfloat16),                  # group 12
    ("bf16", 16, 1, 256, 16, [40, 300], torch.float16),                     # group 16, D 256
    ("int4-bdr:h=128,kv,seed=2", 40, 8, 128, 64, [16, 64], torch.bfloat16),  # group 5
    ("int4-bdr", 32, 8, 128, 64, [20000, 12345], torch.float16),            # many splits
    ("int4", 2, 2, 128, 64, [1], torch.float16),                            # group 1
]
GRAPH_CASES = [CASES[0], CASES[-2]]
# INT8 pages (never rotated): every head dim, both n-tile counts (groups <= 8 and 9..16)
INT8_CASES = [
    ("int8", 32, 8, 128, 64, [1, 54, 97, 1000, 3001], torch.float16),
    ("int8", 32, 8, 128, 16, [17, 300, 2049], torch.bfloat16),
    ("int8", 9, 3, 64, 16, [1, 31, 517], torch.bfloat16),
    ("int8", 8, 1, 256, 32, [3, 77, 1200], torch.float16),
    ("int8", 16, 1, 128, 64, [7, 450], torch.bfloat16),                     # group 16
    ("int8", 12, 1, 64, 128, [130, 1000], torch.float16),                   # group 12
    ("int8", 16, 1, 256, 16, [40, 300], torch.bfloat16),                    # group 16, D 256
    ("int8", 40, 8, 128, 32, [16, 64], torch.float16),                      # group 5
    ("int8", 32, 8, 128, 64, [20000, 12345], torch.bfloat16),               # many splits
]
CASES += INT8_CASES
GRAPH_CASES.append(INT8_CASES[0])


def run_case(lib, gen, case, graph: bool = False) -> tuple[bool, str]:
    policy, hq, hkv, d, page, lens, dtype = case
    # the reference's sign vector lives on the CPU: seeded policies are written and checked there
    dev = "cpu" if "seed=" in policy else "cuda"
    layout, q, pool, bt, seq_lens = build_case(gen, policy, hq, hkv, d, page, lens, dtype,
                                               device=dev)
    ref = reference.paged_attention(q.float(), pool, layout, bt, seq_lens.cpu()).cpu()
    q, pool, bt, seq_lens = q.cuda(), pool.cuda(), bt.cuda(), seq_lens.cuda()
    call = DecodeCall(lib, layout, q, pool, bt, seq_lens)
    if graph:  # captured once, replayed: the launch must be capturable (PDL reducer included)
        call()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        call.out.fill_(float("nan"))
        g.replay()
        out = call.out.float().cpu()
    else:
        call.out.fill_(float("nan"))
        out = call().float().cpu()
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    rel = float((out - ref).norm() / ref.norm())
    worst = float(((out - ref).abs() / (ref.abs().amax(-1, keepdim=True) + 1e-6)).max())
    ok = finite and rel < TOL
    return ok, (f"{'ok  ' if ok else 'FAIL'}{'(graph)' if graph else ''} {policy:26s} Hq={hq:2d} Hkv={hkv} D={d:3d} P={page:3d} "
                f"{str(dtype).replace('torch.', ''):8s} lens={lens} rel={rel:.2e} "
                f"worst/rowmax={worst:.2e} finite={finite} splits_ws={call.ws.numel()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    lib = DecodeLib(args.lib)
    print("library:", lib.name)
    gen = torch.Generator().manual_seed(args.seed)
    bad = 0
    for case in CASES:
        try:
            ok, line = run_case(lib, gen, case)
        except Exception as e:  # report and keep going
            ok, line = False, f"FAIL {case[:5]} raised {type(e).__name__}: {e}"
        bad += not ok
        print(line, flush=True)
    for case in GRAPH_CASES:  # CUDA graph capture + replay
        try:
            ok, line = run_case(lib, gen, case, graph=True)
        except Exception as e:
            ok, line = False, f"FAIL (graph) {case[:5]} raised {type(e).__name__}: {e}"
        bad += not ok
        print(line, flush=True)
    total = len(CASES) + len(GRAPH_CASES)
    print(f"{total - bad}/{total} cases passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
