"""Skinny-GEMM benchmark: saw_linear against cuBLAS (F.linear) on a model's decode-step GEMM
shapes at a few rows, with the effective weight bandwidth and its fraction of the
device-to-device copy bandwidth measured in the same run, and the per-step sum over all layers.

Timing as bench.kernels: CUDA events around each launch, a 256 MB buffer written between
launches (nothing sits in L2), median over `reps`.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ..kernels import linear as lin
from ..models.specs import get_spec
from .kernels import _l2_flush_buffer, copy_bandwidth, time_ms


def shapes(spec) -> dict[str, tuple[int, int, int]]:
    """name -> (N, K, launches per decode step) of the spec's linear layers."""
    d, hq, hkv, h = spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.hidden_size
    layers = spec.num_layers
    return {"qkv": ((hq + 2 * hkv) * d, h, layers), "o": (h, hq * d, layers),
            "gate_up": (2 * spec.intermediate_size, h, layers),
            "down": (h, spec.intermediate_size, layers), "lm_head": (spec.vocab_size, h, 1)}


def run(model: str = "qwen3-4b", rows=(1, 2, 3, 4, 6, 8), reps: int = 30,
        dtype=torch.bfloat16) -> dict:
    spec = get_spec(model)
    copy = copy_bandwidth(torch)
    flush = _l2_flush_buffer(torch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for name, (n, k, per_step) in shapes(spec).items():
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            row = {"gemm": name, "n": n, "k": k, "m": m, "per_step": per_step,
                   "weight_bytes": w.numel() * w.element_size(),
                   "cublas_ms": time_ms(torch, lambda: F.linear(x, w), reps, flush)}
            if lin.kernel_serves(x, w, max_rows=8, max_weight_bytes=1 << 40):
                y = torch.empty(m, n, device="cuda", dtype=dtype)
                row["saw_ms"] = time_ms(torch, lambda: lin.skinny_linear(x, w, out=y), reps,
                                        flush)
            out.append(row)
        del w
    return {"model": model, "gpu": torch.cuda.get_device_name(), "dtype": str(dtype),
            "copy_tbps": copy, "rows": out}


def table(rec: dict) -> str:
    copy = rec["copy_tbps"]
    lines = [f"{rec['gpu']}, {rec['model']} {rec['dtype']}, copy bandwidth {copy:.2f} TB/s",
             f"{'gemm':8s} {'N x K':>13s} {'M':>2s} {'cuBLAS us':>10s} {'saw us':>8s} "
             f"{'saw/copy':>8s} {'cuBLAS/copy':>11s} {'speedup':>7s}"]
    for r in rec["rows"]:
        floor = r["weight_bytes"] / (copy * 1e12) * 1e3
        saw = r.get("saw_ms")
        lines.append(
            f"{r['gemm']:8s} {r['n']:>6d} x {r['k']:<5d} {r['m']:>2d} {r['cublas_ms'] * 1e3:10.1f} "
            + (f"{saw * 1e3:8.1f} {floor / saw:8.0%} " if saw else f"{'-':>8s} {'-':>8s} ")
            + f"{floor / r['cublas_ms']:11.0%} "
            + (f"{r['cublas_ms'] / saw:6.2f}x" if saw else ""))
    for m in sorted({r["m"] for r in rec["rows"]}):
        rs = [r for r in rec["rows"] if r["m"] == m]
        floor = sum(r["weight_bytes"] * r["per_step"] for r in rs) / (copy * 1e12) * 1e3
        cub = sum(r["cublas_ms"] * r["per_step"] for r in rs)
        line = f"per decode step, M={m}: weight floor {floor:.3f} ms, cuBLAS {cub:.3f} ms"
        if all("saw_ms" in r for r in rs):
            saw = sum(r["saw_ms"] * r["per_step"] for r in rs)
            line += f", saw_linear {saw:.3f} ms ({floor / saw:.0%} of the floor's rate)"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-4b")
    ap.add_argument("--rows", default="1,2,3,4,6,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rec = run(a.model, tuple(int(m) for m in a.rows.split(",")), a.reps)
    print(table(rec), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
