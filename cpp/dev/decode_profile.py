#!/usr/bin/env python3
"""Target for Nsight Compute: one decode shape, a few launches.

    ncu --clock-control none -k regex:DecodeKernel -s 2 -c 1 python3 cpp/dev/decode_profile.py \
        --policy int4-bdr --batch 32 --ctx 16384
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from sawtrt.bench.decode_runner import DecodeCall, DecodeLib  # noqa: E402
from sawtrt.bench.kernels import SHAPES, random_pool  # noqa: E402
from sawtrt.spec import KVPolicy, PageLayout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="int4-bdr")
    ap.add_argument("--shape", default="qwen3-4b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--launches", type=int, default=4)
    ap.add_argument("--lib", default=None,
                    help="library path, or several comma-separated: each runs --launches times, "
                         "in order (profile them with ncu -s/-c)")
    a = ap.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layout = PageLayout(KVPolicy.parse(a.policy), d, hkv, a.page)
    pages = math.ceil(a.ctx / a.page)
    pool = random_pool(torch, layout, a.batch * pages, gen)
    bt = torch.randperm(a.batch * pages, device="cuda", generator=gen).int().view(a.batch, pages)
    q = torch.randn(a.batch, hq, d, device="cuda", generator=gen).bfloat16()
    lens = torch.full((a.batch,), a.ctx, dtype=torch.int32, device="cuda")
    for path in (a.lib.split(",") if a.lib else [None]):
        call = DecodeCall(DecodeLib(path), layout, q, pool, bt, lens)
        for _ in range(a.launches):
            call()
        torch.cuda.synchronize()
    print("splits workspace bytes", call.ws.numel())


if __name__ == "__main__":
    main()
