"""Decode-step time of the runtime: B sequences of `context` tokens, all decoding.

    python -m sawtrt.bench.decode_step --engine engines/qwen3-4b-int4-bdr --batch 1,32,128 \
        --context 1024 --steps 20 --json out.json

Prints, per batch size, the median wall time of one `LLMEngine.step()` (schedule + metadata +
forward + sampling + detokenization; on GPU the forward is a CUDA-graph replay when the kernels
are present) and of the forward alone (CUDA events), tokens/s, and the KV bytes the step reads
(B * context * bytes/token over all layers) with the bandwidth that implies.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .step_timer import ForwardTimer
from .throughput import start_decoding
from ..engine.llm_engine import LLMEngine


def bench(engine: LLMEngine, batch: int, context: int, steps: int, warmup: int = 3) -> dict:
    rids = start_decoding(engine, batch, context, warmup + steps, "b")
    step_ms = []
    with ForwardTimer(engine) as timer:
        for _ in range(warmup + steps):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
    if not all(r.is_decode and r.batch_size == batch for r in timer.records):
        raise RuntimeError("a timed step was not a decode step of the whole batch")
    fwd_ms = [r.forward_ms for r in timer.records]
    for r in rids:
        engine.abort_request(r)
    engine.step()
    step = statistics.median(step_ms[warmup:])
    fwd = statistics.median(fwd_ms[warmup:])
    cfg = engine.config
    kv_bytes = batch * (context + warmup + steps // 2) * \
        cfg.layout.bytes_per_token(cfg.model.num_layers)
    return {"batch": batch, "context": context, "step_ms": round(step, 3),
            "forward_ms": round(fwd, 3), "tokens_per_s": round(batch / step * 1e3, 1),
            "kv_bytes_per_step": kv_bytes,
            "kv_GBps_in_forward": round(kv_bytes / (fwd * 1e-3) / 1e9, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--batch", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-policy", default=None, help="override the engine's KV policy")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_dir(a.engine, device=a.device, kv_policy=a.kv_policy,
                                       max_num_seqs=max(batches), max_num_batched_tokens=8192)
    load_s = time.perf_counter() - t0
    rows = [bench(engine, b, a.context, a.steps) for b in batches]
    info = {"engine": a.engine, "model": engine.config.model.name,
            "kv_policy": str(engine.config.layout.policy), "device": str(engine.device),
            "gpu": torch.cuda.get_device_name() if engine.device.type == "cuda" else None,
            "dtype": str(engine.model.dtype), "fused_kernels": engine.model.fused,
            "graphs": engine.runner.graph_note, "load_s": round(load_s, 1), "rows": rows}
    print(json.dumps(info, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
