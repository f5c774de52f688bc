#!/usr/bin/env python3
"""One device call for several sandbox decode libraries: validate each against the reference
(inputs and reference built once per case, then every library runs on them), then time each on
the key shapes, interleaved, with BF16 SDPA and the copy bandwidth measured once.

    python3 cpp/dev/decode_multi.py --libs v0=build/v0/libsawdecode_dev.so,v2=build/v2/... \
        --json $OUT/multi.json [--shapes 32x16384,128x16384,...] [--reps 20] [--rounds 2]

Prints a pass/fail line per (case, library), then one timing line per (shape, library); the
library named first is the baseline of the ratios. Writes the best valid library (lowest time at
the first shape) to --best."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import decode_check as dc  # noqa: E402
from sawtrt import reference  # noqa: E402
from sawtrt.bench import kernels as kb  # noqa: E402
from sawtrt.bench.decode_runner import DecodeCall, DecodeLib  # noqa: E402
from sawtrt.spec import KVPolicy, PageLayout  # noqa: E402


def validate(libs: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    bad = {name: 0 for name in libs}
    cases = [(c, False) for c in dc.CASES] + [(dc.CASES[0], True), (dc.CASES[-2], True)]
    for case, graph in cases:
        policy, hq, hkv, d, page, lens, dtype = case
        dev = "cpu" if "seed=" in policy else "cuda"
        layout, q, pool, bt, seq_lens = dc.build_case(gen, policy, hq, hkv, d, page, lens, dtype,
                                                      device=dev)
        ref = reference.paged_attention(q.float(), pool, layout, bt, seq_lens.cpu()).cpu()
        q, pool, bt, seq_lens = q.cuda(), pool.cuda(), bt.cuda(), seq_lens.cuda()
        for name, lib in libs.items():
            try:
                call = DecodeCall(lib, layout, q, pool, bt, seq_lens)
                if graph:
                    call()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        call()
                    call.out.fill_(float("nan"))
                    g.replay()
                else:
                    call.out.fill_(float("nan"))
                    call()
                torch.cuda.synchronize()
                out = call.out.float().cpu()
                finite = bool(torch.isfinite(out).all())
                rel = float((out - ref).norm() / ref.norm())
                ok = finite and rel < dc.TOL
                msg = f"rel={rel:.2e} finite={finite}"
            except Exception as e:  # report and keep going
                ok, msg = False, f"raised {type(e).__name__}: {e}"
            bad[name] += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:4s} {'(graph) ' if graph else ''}{policy:24s} "
                  f"Hq={hq} Hkv={hkv} D={d} P={page} {str(dtype)[6:]} lens={lens} {msg}", flush=True)
    n = len(cases)
    for name in libs:
        print(f"check {name}: {n - bad[name]}/{n} cases passed", flush=True)
    return {name: bad[name] == 0 for name in libs}


def time_shapes(libs: dict, shapes, reps: int, rounds: int, shape_name="qwen3-4b") -> list:
    hq, hkv, d = kb.SHAPES[shape_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    flush = kb._l2_flush_buffer(torch)
    copy = kb.copy_bandwidth(torch)
    print(f"copy bandwidth {copy:.2f} TB/s", flush=True)
    rows = []
    page = 64
    for batch, ctx in shapes:
        q = torch.randn(batch, hq, d, device="cuda", generator=gen).to(torch.bfloat16)
        qo_bytes = 2 * q.numel() * 2
        pages = -(-ctx // page)
        bt = torch.randperm(batch * pages, device="cuda", generator=gen).int().view(batch, pages)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        row = {"batch": batch, "ctx": ctx, "copy_tbps": copy, "ms": {}}
        for policy in ("int4-bdr", "int4"):
            layout = PageLayout(KVPolicy.parse(policy), d, hkv, page)
            pool = kb.random_pool(torch, layout, batch * pages, gen)
            nbytes = batch * ctx * hkv * layout.token_bytes + qo_bytes
            row[f"bytes_{policy}"] = nbytes
            calls = {name: DecodeCall(lib, layout, q, pool, bt, lens, ctx)
                     for name, lib in libs.items()}
            got = {name: [] for name in libs}
            for _ in range(rounds):
                for name, call in calls.items():
                    got[name].append(kb.time_ms(torch, call, reps, flush))
            for name, v in got.items():
                row["ms"][f"{name}/{policy}"] = v
            del pool, calls
        k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        ms, backend = kb.sdpa_best(torch, q.view(batch, hq, 1, d), k, v, reps, flush)
        del k, v
        row["sdpa_ms"], row["sdpa_backend"] = ms, backend
        torch.cuda.empty_cache()
        for name in libs:
            bdr = statistics.mean(row["ms"][f"{name}/int4-bdr"])
            i4 = statistics.mean(row["ms"][f"{name}/int4"])
            tb = row["bytes_int4-bdr"] / (bdr * 1e-3) / 1e12
            print(f"B={batch:4d} ctx={ctx:6d} {name:4s} bdr {bdr * 1e3:8.1f} us "
                  f"({', '.join(f'{x * 1e3:.1f}' for x in row['ms'][f'{name}/int4-bdr'])}) "
                  f"int4 {i4 * 1e3:8.1f} us  {tb:5.2f} TB/s {100 * tb / copy:5.1f}% copy  "
                  f"sdpa {ms * 1e3 if ms else float('nan'):7.1f} us ({backend}) "
                  f"sdpa/bdr {ms / bdr if ms else float('nan'):5.2f}  bdr/int4 {bdr / i4:5.3f}",
                  flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--libs", required=True, help="name=path,... (first = baseline)")
    ap.add_argument("--shapes", default="32x16384,128x16384,8x32768,1x1024,32x1024")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--best", default=None)
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    libs = {}
    for item in a.libs.split(","):
        name, path = item.split("=", 1)
        libs[name] = DecodeLib(path)
    valid = {name: True for name in libs} if a.no_check else validate(libs)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    rows = time_shapes(libs, shapes, a.reps, a.rounds)
    if a.json:
        Path(a.json).write_text(json.dumps({"valid": valid, "rows": rows}, indent=1))
    first = rows[0]
    cands = [n for n in libs if valid[n]]
    best = min(cands, key=lambda n: statistics.mean(first["ms"][f"{n}/int4-bdr"]))
    print(f"best at B={first['batch']} ctx={first['ctx']}: {best}", flush=True)
    if a.best:
        Path(a.best).write_text(best)
    return 0 if all(valid.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
