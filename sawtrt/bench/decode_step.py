"""Decode-step time of the runtime: B sequences of `context` tokens, all decoding.

    python -m sawtrt.bench.decode_step --engine engines/qwen3-4b-int4-bdr --batch 1,32,128 \
        --context 1024 --steps 20 --json out.json

Prints, per batch size, the median wall time of one `LLMEngine.step()` (schedule + metadata +
forward + sampling + detokenization; on GPU the forward is a CUDA-graph replay when the kernels
are present; with async scheduling, the default on GPU, the step period) and of the forward
alone (CUDA events), the device's idle time before each step (host time not hidden), tokens/s,
and the KV bytes the step reads (B * context * bytes/token over all layers) with the bandwidth
that implies, and the step's byte floor (weights + that KV at the copy bandwidth measured at
start) with the forward's multiple of it. `--compile on,off`, `--scheduling async,sync` and
`--kv-policy 'a;b'` compare settings in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from . import roofline
from .step_timer import ForwardTimer
from .throughput import start_decoding
from ..engine.llm_engine import LLMEngine


def bench(engine: LLMEngine, batch: int, context: int, steps: int, warmup: int = 3) -> dict:
    rids = start_decoding(engine, batch, context, warmup + steps, "b")
    step_ms = []
    with ForwardTimer(engine) as timer:
        # no synchronisation between steps: with async scheduling a step() call returns the
        # previous step's tokens, and its wall time is the step period only while the host
        # runs ahead of the device
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            engine.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
    if not all(r.is_decode and r.batch_size == batch for r in timer.records):
        raise RuntimeError("a timed step was not a decode step of the whole batch")
    fwd_ms = [r.forward_ms for r in timer.records]
    dev_ms = [r.device_ms for r in timer.records]
    idle_ms = [r.idle_before_ms for r in timer.records[warmup:] if r.idle_before_ms is not None]
    for r in rids:
        engine.abort_request(r)
    engine.step()
    step = statistics.median(step_ms[warmup:])
    fwd = statistics.median(fwd_ms[warmup:])
    dev = statistics.median(dev_ms[warmup:])
    cfg = engine.config
    kv_bytes = batch * (context + warmup + steps // 2) * \
        cfg.layout.bytes_per_token(cfg.model.num_layers)
    return {"batch": batch, "context": context, "step_ms": round(step, 3),
            "forward_ms": round(fwd, 3), "device_ms": round(dev, 3),
            "step_vs_device": round(step / dev, 3), "tokens_per_s": round(batch / step * 1e3, 1),
            "async_scheduling": engine.async_scheduling,
            "gpu_idle_ms": round(statistics.median(idle_ms), 3) if idle_ms else None,
            "kv_bytes_per_step": kv_bytes,
            "kv_GBps_in_forward": round(kv_bytes / (fwd * 1e-3) / 1e9, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--batch", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-policy", default=None,
                    help="override the engine's KV policy; several, separated by ';', run one "
                         "after another in this process")
    ap.add_argument("--compile", default="auto",
                    help="torch.compile of the layers' work around the GEMMs: auto, on, off, or "
                         "a comma list (on,off) to compare in this process")
    ap.add_argument("--kv-memory-gib", type=float, default=None,
                    help="KV pool budget [default: the engine's, 60 %% of free GPU memory]; "
                         "256 sequences of 8K int4-bdr need ~84 GB")
    ap.add_argument("--scheduling", default="auto",
                    help="auto (async on CUDA), async, sync, or a comma list (async,sync) to "
                         "compare in this process")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    dev = torch.device(a.device) if a.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    copy_tbps = roofline.measure_copy_tbps(dev)
    runs = []
    for pol in (a.kv_policy.split(";") if a.kv_policy else [None]):
        for comp, mode in [(c, m) for c in a.compile.split(",")
                           for m in a.scheduling.split(",")]:
            runs.append(run_one(a, pol, comp.strip(), batches, copy_tbps, mode.strip()))
            print(json.dumps(runs[-1], indent=1), flush=True)
    print(f"copy bandwidth {copy_tbps:.2f} TB/s")
    print(f"{'policy':<34} {'compile':<8} {'sched':<5} {'batch':>5} {'step ms':>8} {'fwd ms':>8} "
          f"{'dev ms':>8} {'step/dev':>8} {'floor ms':>8} {'fwd/floor':>9} {'tok/s':>8} "
          f"{'idle ms':>7}")
    for r in runs:
        for row in r["rows"]:
            sched = "async" if row["async_scheduling"] else "sync"
            print(f"{r['kv_policy']:<34} {r['compile']:<8} {sched:<5} {row['batch']:>5} "
                  f"{row['step_ms']:>8.3f} {row['forward_ms']:>8.3f} {row['device_ms']:>8.3f} "
                  f"{row['step_vs_device']:>8.3f} {row['roofline_step_ms']:>8.3f} "
                  f"{row['forward_vs_roofline']:>9.2f} {row['tokens_per_s']:>8.1f} "
                  f"{row['gpu_idle_ms'] if row['gpu_idle_ms'] is not None else '-':>7}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"copy_tbps": copy_tbps, "runs": runs}, f, indent=1)


def run_one(a, policy, comp: str, batches: list[int], copy_tbps: float,
            scheduling: str = "auto") -> dict:
    """One engine (policy, compile setting, scheduling) loaded, benchmarked and freed."""
    import gc
    if comp not in ("auto", "on", "off"):
        raise SystemExit(f"--compile: expected auto, on or off, got {comp!r}")
    modes = {"auto": "auto", "async": True, "sync": False}
    if scheduling not in modes:
        raise SystemExit(f"--scheduling: expected auto, async or sync, got {scheduling!r}")
    if comp != "auto":
        os.environ["SAWTRT_COMPILE"] = "1" if comp == "on" else "0"
    t0 = time.perf_counter()
    kv_bytes = int(a.kv_memory_gib * 2**30) if a.kv_memory_gib else None
    engine = LLMEngine.from_engine_dir(a.engine, device=a.device, kv_policy=policy,
                                       max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                       kv_memory_bytes=kv_bytes,
                                       async_scheduling=modes[scheduling])
    load_s = time.perf_counter() - t0
    os.environ.pop("SAWTRT_COMPILE", None)
    rows = [bench(engine, b, a.context, a.steps) for b in batches]
    cfg = engine.config
    weights = roofline.decode_weight_bytes(cfg.model, engine.model.dtype.itemsize)
    for row in rows:
        # the byte floor of this decode step: weights + the KV it reads at the copy bandwidth
        row["weight_floor_ms"] = round(weights / (copy_tbps * 1e12) * 1e3, 3)
        row["roofline_step_ms"] = round((weights + row["kv_bytes_per_step"])
                                        / (copy_tbps * 1e12) * 1e3, 3)
        row["forward_vs_roofline"] = round(row["forward_ms"] / row["roofline_step_ms"], 2)
    info = {"engine": a.engine, "model": cfg.model.name, "kv_policy": str(cfg.layout.policy),
            "compile": comp, "compile_note": engine.model.compile_note,
            "device": str(engine.device),
            "gpu": torch.cuda.get_device_name() if engine.device.type == "cuda" else None,
            "dtype": str(engine.model.dtype), "fused_kernels": engine.model.fused,
            "graphs": engine.runner.graph_note, "load_s": round(load_s, 1), "rows": rows}
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return info


if __name__ == "__main__":
    main()
