"""Our paged model vs transformers' Qwen3 / Llama with the same random weights.

Qwen3 at real per-layer shapes (qwen3-0.6b: hidden 1024, 16 query / 8 KV heads, D = 128,
q_norm/k_norm, RoPE theta 1e6, tied embeddings) with 2 layers and a reduced vocabulary. The
oracle's attention stores K/V the way our cache does under the policy under test (bf16 rounding,
or rotate + token-wise quantize). Both run in fp64: in fp32 the op-order differences of GEMMs
blocked for different row counts (a 7-token chunk against the whole prompt) move one stored int4
code in about half of all prompt draws, and on an int4 grid of this size one code moves the logits
by ~1e-2, as a real bug would. In fp64 those differences vanish in the fp32 casts both models
make (RMSNorm, the cache's fp32 quantizer); what is left are the fp32-level differences of two
implementations that round at different points.
The step mixes chunked prefills and decodes (token budget 7, prompts 1/13/21 tokens, pages of
16 with partial last pages).
"""
from __future__ import annotations

import pytest
import torch

from runtime_helpers import build_tiny, hf_logits, hf_model, replace
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.engine.sampling import SamplingParams
from sawtrt.models.specs import get_spec
from sawtrt.models.weights import random_weights
from sawtrt.spec import KVPolicy

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def qwen3_small():
    return replace(get_spec("qwen3-0.6b"), num_layers=2, vocab_size=2048, max_position=256,
                   eos_token_id=None, bos_token_id=None)


def run_recording(engine: LLMEngine, prompts, max_tokens):
    """Drive the engine; record the logits row each sequence sampled from, per position."""
    rec: dict[str, list[torch.Tensor]] = {f"r{i}": [] for i in range(len(prompts))}
    runner = engine.runner
    orig = runner.forward

    def forward(batch):
        logits = orig(batch)
        rows = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed + n == len(s)]
        for s, row in zip(rows, logits):
            rec[s.request_id].append(row.clone())
        return logits

    runner.forward = forward
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    outs: dict[str, list[int]] = {k: [] for k in rec}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
        steps += 1
    return rec, outs, steps


POLICIES = ["bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=32,kv,seed=7",
            # per-layer pages: the oracle stores each layer like policy.for_layer(i)
            "int4:int8=1", "int4-bdr:h=32,kv,seed=7,bf16=0"]


@pytest.mark.parametrize("arch,policy", [("qwen3", p) for p in POLICIES]
                         + [("llama", "bf16"), ("llama", "int4-bdr")])
def test_forward_matches_transformers(tmp_path, arch, policy):
    spec = qwen3_small() if arch == "qwen3" else replace(
        qwen3_small(), arch="llama", qk_norm=False, rope_theta=100000.0, tie_embeddings=False,
        num_kv_heads=4)
    eng_dir = build_tiny(tmp_path, spec, kv_cache=policy, max_seq_len=64, name=f"t-{arch}")
    engine = LLMEngine.from_engine_dir(eng_dir, device="cpu", dtype=torch.float64,
                                       max_num_batched_tokens=7, max_num_seqs=4)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist()
               for n in (1, 13, 21)]
    rec, outs, steps = run_recording(engine, prompts, max_tokens=6)
    assert engine.kv_cache_usage()["used_pages"] == 0

    weights = random_weights(spec, seed=0, dtype=torch.float64)
    ref = hf_model(spec, weights, KVPolicy.parse(policy), dtype=torch.float64)
    worst = 0.0
    for i, p in enumerate(prompts):
        toks = outs[f"r{i}"]
        assert len(toks) == 6
        full = p + toks
        want = hf_logits(ref, full)[len(p) - 1:len(full) - 1]          # rows that predicted toks
        got = torch.stack(rec[f"r{i}"])
        assert got.shape == want.shape
        err = (got - want).abs().max().item() / want.abs().max().item()
        worst = max(worst, err)
        # greedy choices agree wherever the oracle's top-2 gap is not a rounding-level tie
        top2 = want.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    # fp32-level implementation differences only (seen at this seed: 1e-7 .. 2e-4, the larger
    # where one bf16 ulp or int8 code moved). Over 30 prompt seeds one int4 code moved once
    # (2.8e-3) and int8 stayed below 6e-4; a real bug (wrong mask, rope, norm, page) gives >1e-2.
    tol = 1e-3
    print(f"{arch} {policy}: max |logit diff| / max |logit| = {worst:.2e} over {steps} steps")
    assert worst < tol
