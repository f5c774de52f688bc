"""The roofline of a serving level: the tok/s the hardware allows for the bytes and FLOPs of the
model spec, so a measured level can say what fraction of its limit it reached.

A level (c users in closed loop, N requests of P prompt and O output tokens) costs
  prefill   per request: max(FLOPs / R, chunks x W / BW)
            FLOPs = 2 x (linear params) x P + 2 x (head params)            GEMMs
                  + 4 x L x Hq x D x P (P + 1) / 2                         causal attention
  decode    N (O - 1) tokens in steps of b = min(c, N, sequences the KV pool holds) sequences;
            one step: max(bytes / BW, FLOPs / R) with
            bytes = W + b x ctx x (KV bytes per token, all layers)          ctx = P + O / 2
            FLOPs = b x (2 x (linear + head params) + 4 x L x Hq x D x ctx)
W = weight bytes a decode step reads (every linear weight and the LM head; the embedding is a
gather of b rows), BW = copy bandwidth (read + write, measured in the same run), R = a stated
tensor-core rate. The first output token comes from the prefill step, hence O - 1 decode
tokens. Roofline tok/s = N x O / (N x prefill + steps x step). Everything else (norms,
activations, host time, scheduling gaps, the prefill of one request stalling the others) is
what the engine adds above the limit.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..models.specs import ModelSpec
from ..models.weights import weight_shapes

# bf16 dense tensor-core rate of the H200 as measured with a large torch.matmul (the team's
# stated ceiling); the CPU has no stated rate: its rate is measured
H200_BF16_TFLOPS = 790.0


@dataclass(frozen=True)
class Hardware:
    copy_tbps: float        # device copy bandwidth, bytes read + written, TB/s
    tflops: float           # dense matmul rate, TFLOP/s
    copy_source: str = "stated"
    tflops_source: str = "stated"


def _numel(shape) -> int:
    return math.prod(shape)


def linear_params(spec: ModelSpec) -> int:
    """Parameters of the per-token linears of all layers (q, k, v, o, gate, up, down)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(_numel(s) for n, s in weight_shapes(spec).items()
               if n.endswith(".weight") and any(f".{x}." in n for x in names))


def head_params(spec: ModelSpec) -> int:
    return spec.vocab_size * spec.hidden_size


def decode_weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Weight bytes one decode step reads: every tensor except the embedding (a gather of a few
    rows), plus the LM head (the embedding itself when tied)."""
    shapes = weight_shapes(spec)
    n = sum(_numel(s) for k, s in shapes.items() if k != "model.embed_tokens.weight")
    if spec.tie_embeddings:
        n += head_params(spec)
    return n * dtype_bytes


def attention_flops(spec: ModelSpec, queries: int, keys: int) -> float:
    """QK^T and PV of `queries` query tokens each over `keys` keys, all layers and heads."""
    return 4.0 * spec.num_layers * spec.num_heads * spec.head_dim * queries * keys


def prefill_flops(spec: ModelSpec, prompt_len: int) -> float:
    causal_pairs = prompt_len * (prompt_len + 1) / 2
    return (2.0 * linear_params(spec) * prompt_len + 2.0 * head_params(spec)
            + attention_flops(spec, 1, 1) * causal_pairs)


def level(spec: ModelSpec, kv_bytes_per_token: int, hw: Hardware, concurrency: int,
          num_requests: int, prompt_len: int, output_len: int,
          kv_capacity_tokens: int | None = None, max_num_batched_tokens: int | None = None,
          dtype_bytes: int = 2, page_size: int = 1) -> dict:
    """The roofline of one level (module doc): tok/s, its decode step and prefill times.
    kv_capacity_tokens (pages x page_size of the pool) caps the batch at the sequences of
    P + O tokens, rounded up to whole pages, that fit."""
    if min(concurrency, num_requests, prompt_len, output_len) < 1:
        raise ValueError("concurrency, requests, prompt and output lengths must be >= 1")
    bw, rate = hw.copy_tbps * 1e12, hw.tflops * 1e12
    w = decode_weight_bytes(spec, dtype_bytes)
    batch = min(concurrency, num_requests)
    if kv_capacity_tokens is not None:
        seq_tokens = -(-(prompt_len + output_len) // page_size) * page_size
        fits = kv_capacity_tokens // seq_tokens
        if fits < 1:
            raise ValueError(f"the KV pool ({kv_capacity_tokens} tokens) holds no sequence of "
                             f"{seq_tokens} tokens")
        batch = min(batch, fits)
    ctx = prompt_len + output_len / 2
    step_bytes = w + batch * ctx * kv_bytes_per_token
    step_flops = batch * (2.0 * (linear_params(spec) + head_params(spec))
                          + attention_flops(spec, 1, ctx))
    step_s = max(step_bytes / bw, step_flops / rate)
    chunks = math.ceil(prompt_len / max_num_batched_tokens) if max_num_batched_tokens else 1
    pre_s = max(prefill_flops(spec, prompt_len) / rate, chunks * w / bw)
    steps = num_requests * (output_len - 1) / batch
    total_s = num_requests * pre_s + steps * step_s
    return {"tok_s": num_requests * output_len / total_s, "batch": batch,
            "decode_step_ms": step_s * 1e3, "decode_step_bound": "bytes"
            if step_bytes / bw >= step_flops / rate else "flops",
            "weight_floor_ms": w / bw * 1e3, "decode_step_bytes": step_bytes,
            "decode_step_flops": step_flops, "prefill_ms_per_request": pre_s * 1e3,
            "time_s": total_s, "copy_tbps": hw.copy_tbps, "tflops": hw.tflops,
            "copy_source": hw.copy_source, "tflops_source": hw.tflops_source}


def annotate(row: dict, roof: dict) -> dict:
    """Add the roofline and the fractions reached to a measured level row (in place)."""
    row["roofline"] = roof
    row["roofline_fraction"] = row["output_tok_s"] / roof["tok_s"]
    dev = row.get("steps", {}).get("decode_device_ms_p50")
    row["decode_step_vs_roofline"] = dev / roof["decode_step_ms"] if dev else None
    return row


def measure_copy_tbps(device: torch.device) -> float:
    """Copy bandwidth of `device` in TB/s (bytes read + written): CUDA events over a 4 GiB
    device-to-device copy with L2 flushed (bench kernels' method); on CPU a 256 MiB memcpy."""
    if device.type == "cuda":
        from .kernels import copy_bandwidth
        with torch.cuda.device(device):
            tbps = copy_bandwidth(torch)
            torch.cuda.empty_cache()      # the 8 GiB of buffers go back before engines size pools
            return tbps
    n = 256 << 20
    a = torch.ones(n, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best / 1e12


def measure_cpu_tflops(n: int = 1024, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def hardware(device: torch.device, tflops: float | None = None) -> Hardware:
    """Copy bandwidth measured now; the matmul rate as given, else H200_BF16_TFLOPS on CUDA and
    a measured fp32 matmul on CPU."""
    copy = measure_copy_tbps(device)
    if tflops is not None:
        return Hardware(copy, tflops, "measured", "stated")
    if device.type == "cuda":
        return Hardware(copy, H200_BF16_TFLOPS, "measured", "stated (H200 bf16 dense)")
    return Hardware(copy, measure_cpu_tflops(), "measured", "measured (CPU fp32 matmul)")


def to_dict(hw: Hardware) -> dict:
    return asdict(hw)
