"""The roofline arithmetic of `sawtrt bench throughput` (sawtrt.bench.roofline), checked against
numbers counted by hand from the model shapes."""
import math

import pytest

from sawtrt.bench import roofline
from sawtrt.models.specs import MODELS, ModelSpec

QWEN3_4B = MODELS["qwen3-4b"]


def tiny(tie: bool) -> ModelSpec:
    # 2 layers, hidden 8, 2 query heads / 1 KV head of D = 4, MLP 16, vocab 10
    return ModelSpec("t", "qwen3", 2, 8, 2, 1, 4, 16, 10, 1e6, 1e-6, tie, 64, qk_norm=True)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_counts_by_hand(tie):
    s = tiny(tie)
    per_layer = 8 * 8 + 2 * (4 * 8) + 8 * 8 + 3 * 16 * 8        # q, k+v, o, gate+up+down
    assert roofline.linear_params(s) == 2 * per_layer
    norms = 2 * (8 + 8 + 4 + 4) + 8                              # in/post, q/k norm; final
    # decode reads every linear, the norms and the head (10 x 8) once; never the embedding
    assert roofline.decode_weight_bytes(s) == 2 * (2 * per_layer + norms + 80)
    assert roofline.decode_weight_bytes(s, dtype_bytes=4) == 2 * roofline.decode_weight_bytes(s)


def test_qwen3_4b_weight_floor():
    """8.04 GB of bf16 weights (tied head): 1.90 ms at 4.24 TB/s, the docs' decode floor."""
    w = roofline.decode_weight_bytes(QWEN3_4B)
    assert w == pytest.approx(8.044e9, rel=1e-3)
    hw = roofline.Hardware(4.24, 790)
    r = roofline.level(QWEN3_4B, 100, hw, 1, 1, 16, 2)
    assert r["weight_floor_ms"] == pytest.approx(w / 4.24e12 * 1e3)


def test_prefill_flops_by_hand():
    s = tiny(True)
    p = 5
    want = 2 * roofline.linear_params(s) * p + 2 * 80 + 4 * 2 * 2 * 4 * (p * (p + 1) / 2)
    assert roofline.prefill_flops(s, p) == pytest.approx(want)


def test_level_decode_bound_by_bytes():
    """One user, one request: prefill (compute bound) + O-1 decode steps reading the weights
    and the KV of P + O/2 tokens."""
    s = QWEN3_4B
    hw = roofline.Hardware(copy_tbps=4.0, tflops=800.0)
    kvb, p, o = 40_000, 8192, 1024
    r = roofline.level(s, kvb, hw, 1, 1, p, o)
    step_bytes = roofline.decode_weight_bytes(s) + (p + o / 2) * kvb
    assert r["decode_step_bound"] == "bytes"
    assert r["decode_step_ms"] == pytest.approx(step_bytes / 4e12 * 1e3)
    pre = roofline.prefill_flops(s, p) / 800e12
    assert r["prefill_ms_per_request"] == pytest.approx(pre * 1e3)
    assert r["tok_s"] == pytest.approx(o / (pre + (o - 1) * step_bytes / 4e12))


def test_level_batch_scaling_and_flops_bound():
    """Many users on a slow matmul: the step is FLOP bound and the batch is the users."""
    s = QWEN3_4B
    hw = roofline.Hardware(copy_tbps=4.0, tflops=1.0)
    r = roofline.level(s, 1000, hw, 64, 128, 100, 10)
    assert r["batch"] == 64 and r["decode_step_bound"] == "flops"
    flops = 64 * (2 * (roofline.linear_params(s) + roofline.head_params(s))
                  + roofline.attention_flops(s, 1, 105))
    assert r["decode_step_ms"] == pytest.approx(flops / 1e12 * 1e3)
    steps = 128 * 9 / 64
    assert r["time_s"] == pytest.approx(128 * r["prefill_ms_per_request"] / 1e3
                                        + steps * r["decode_step_ms"] / 1e3)


def test_pool_caps_the_batch_and_chunks_reread_weights():
    s = QWEN3_4B
    hw = roofline.Hardware(copy_tbps=4.0, tflops=1e9)    # matmuls free: prefill = weight reads
    # 3 sequences of 1000 + 24 tokens = 16 pages of 64 fit in 50 pages
    r = roofline.level(s, 1000, hw, 8, 8, 1000, 24, kv_capacity_tokens=50 * 64, page_size=64,
                       max_num_batched_tokens=256)
    assert r["batch"] == 3
    w = roofline.decode_weight_bytes(s)
    assert r["prefill_ms_per_request"] == pytest.approx(math.ceil(1000 / 256) * w / 4e12 * 1e3)
    with pytest.raises(ValueError, match="holds no sequence"):
        roofline.level(s, 1000, hw, 8, 8, 1000, 24, kv_capacity_tokens=10 * 64, page_size=64)
    with pytest.raises(ValueError, match=">= 1"):
        roofline.level(s, 1000, hw, 0, 8, 1000, 24)


def test_issue_numbers_for_qwen3_4b():
    """The c = 64, 8 K / 1 K roofline at 4.24 TB/s and 700 TFLOP/s: ~2 260 tok/s for bf16
    pages (147 456 B/token) and ~4 500 for INT4 pages (36 x 8 x 2 x 68 B)."""
    hw = roofline.Hardware(4.24, 700)
    bf16 = roofline.level(QWEN3_4B, 36 * 8 * 2 * 256, hw, 64, 64, 8192, 1024)
    int4 = roofline.level(QWEN3_4B, 36 * 8 * 2 * 68, hw, 64, 64, 8192, 1024)
    assert 2200 < bf16["tok_s"] < 2300 and 4400 < int4["tok_s"] < 4600
    assert bf16["decode_step_bound"] == int4["decode_step_bound"] == "bytes"


def test_annotate():
    row = {"output_tok_s": 50.0, "steps": {"decode_device_ms_p50": 3.0}}
    roofline.annotate(row, {"tok_s": 200.0, "decode_step_ms": 2.0})
    assert row["roofline_fraction"] == 0.25 and row["decode_step_vs_roofline"] == 1.5
    row = {"output_tok_s": 50.0, "steps": {"decode_device_ms_p50": None}}
    assert roofline.annotate(row, {"tok_s": 100.0, "decode_step_ms": 2.0})[
        "decode_step_vs_roofline"] is None


def test_measured_cpu_hardware():
    import torch
    hw = roofline.hardware(torch.device("cpu"))
    assert hw.copy_tbps > 0 and hw.tflops > 0 and hw.copy_source == "measured"
    assert roofline.hardware(torch.device("cpu"), tflops=5.0).tflops == 5.0
