"""Where one decode step's time goes: device time per kernel class, and host time around it.

B sequences of `context` random tokens are prefilled, then `steps` decode steps run exactly as
the engine serves them (CUDA-graph replay when the kernels are present) under torch.profiler.
Kernels are grouped by name into classes; "host" is the step's wall time minus the forward's
device share (forward minus its metadata build): scheduling, metadata, sampling,
detokenization. "gaps" = device share minus the kernels' own time (launch gaps, graph-input
copies, and the profiler's own overhead).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from .step_timer import ForwardTimer
from .throughput import make_engine, start_decoding

# first match wins; names are the CUDA kernel names as the profiler reports them
CLASSES = (
    ("attention (saw decode/prefill)", ("DecodeKernel", "DecodeReduceKernel", "PrefillKernel")),
    ("kv write (saw)", ("WriteKVKernel",)),
    ("gemm", ("gemm", "Gemm", "GEMM", "nvjet", "cutlass", "xmma", "cublas", "splitK",
              "LinearKernel")),
    ("compiled layer work (norms, RoPE, residual, SiLU)", ("triton_",)),
    ("reductions (norms, argmax)", ("reduce_kernel", "Reduce", "norm", "argmax")),
    ("copies / cat / index", ("copy", "Copy", "cat", "Cat", "index", "Index", "gather",
                              "scatter", "embedding")),
    ("elementwise (rope, silu, residual)", ("elementwise", "Elementwise", "vectorized")),
)


def classify(name: str) -> str:
    for label, keys in CLASSES:
        if any(k in name for k in keys):
            return label
    return "other"


def profile_decode(engine, batch: int, context: int, steps: int = 5, warmup: int = 3) -> dict:
    rids = start_decoding(engine, batch, context, warmup + steps, "prof")
    for _ in range(warmup):
        engine.step()
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    walls = []
    acts = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with ForwardTimer(engine) as timer, torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            walls.append((time.perf_counter() - t0) * 1e3)
    if not all(r.is_decode and r.batch_size == batch for r in timer.records):
        raise RuntimeError("a profiled step was not a decode step of the whole batch")
    by_class: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.time_range.elapsed_us()          # the kernel's own duration
        by_class[classify(ev.name)] += us / steps
        by_kernel[ev.name][0] += us / steps
        by_kernel[ev.name][1] += 1
    for r in rids:
        engine.abort_request(r)
    engine.step()
    fwd = statistics.median(r.forward_ms for r in timer.records)
    dev = statistics.median(r.device_ms for r in timer.records)
    wall = statistics.median(walls)
    gpu_ms = sum(by_class.values()) / 1e3
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:24]
    return {"batch": batch, "context": context, "steps": steps, "step_wall_ms": wall,
            "forward_ms": fwd, "device_ms": dev, "kernel_ms": gpu_ms, "host_ms": wall - dev,
            "forward_gaps_ms": dev - gpu_ms,
            "classes_ms": {k: v / 1e3 for k, v in sorted(by_class.items(), key=lambda x: -x[1])},
            "top_kernels": [{"name": n[:120], "ms_per_step": v[0] / 1e3,
                             "launches_per_step": v[1] / steps} for n, v in top]}


def format_profile(policy: str, r: dict) -> str:
    lines = [f"{policy}: B={r['batch']} ctx={r['context']}: step {r['step_wall_ms']:.2f} ms = "
             f"device {r.get('device_ms', r['forward_ms']):.2f} (kernels {r['kernel_ms']:.2f}, gaps "
             f"{r['forward_gaps_ms']:.2f}) + host {r['host_ms']:.2f}"]
    for k, v in r["classes_ms"].items():
        lines.append(f"    {k:<36} {v:8.3f} ms  {100 * v / max(r['kernel_ms'], 1e-9):5.1f} %")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--policies", default="bf16,int4-bdr")
    ap.add_argument("--points", default="1x8192,64x8192",
                    help="BATCHxCONTEXT, comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kv-memory-gib", type=float, default=60.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from ..spec import split_policy_list
    pts = [tuple(int(x) for x in p.split("x")) for p in a.points.split(",")]
    out = []
    for pol in split_policy_list(a.policies):
        eng = make_engine(a.engine, pol, max(b for b, _ in pts), a.kv_memory_gib,
                          max(8192, max(b for b, _ in pts)))
        for b, c in pts:
            r = profile_decode(eng, b, c, a.steps)
            r["policy"] = pol
            print(format_profile(pol, r), flush=True)
            out.append(r)
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
