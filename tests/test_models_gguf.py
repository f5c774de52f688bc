"""GGUF loading for the qwen3 architecture (no public Qwen3 GGUF is reachable here): write a small
Qwen3 GGUF with the `gguf` package's own writer — F32 and Q8_0 tensors, llama.cpp names and
metadata, a byte-level BPE vocabulary — and load it back through sawtrt's loader, spec reader,
tokenizer and `sawtrt build --checkpoint FILE.gguf`. (The llama-architecture path, with its Q/K
row permutation, is checked against transformers on the real SmolLM2 GGUF.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime_helpers import tiny_spec
from sawtrt.build import BuildOptions, build_engine
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.models import tokenizer as tokenizers
from sawtrt.models.weights import load_gguf, random_weights

gguf = pytest.importorskip("gguf")

NAMES = {"input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_norm.weight": "attn_q_norm.weight",
         "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
         "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def write_qwen3_gguf(path, spec, weights):
    from tokenizers import pre_tokenizers
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens[-1] = "<|end|>"                                  # one control token
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(len(tokens) - 1)
    for name, t in weights.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{NAMES[rest]}"
        a = t.float().numpy()
        if a.ndim == 2:                                     # matrices stored as Q8_0
            w.add_tensor(gname, gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_gguf_roundtrip_and_build(tmp_path):
    spec = tiny_spec("qwen3", head_dim=32, num_heads=4, num_kv_heads=2, hidden_size=96,
                     intermediate_size=64)
    weights = random_weights(spec, seed=5, dtype=torch.float32)
    path = tmp_path / "tiny-qwen3.Q8_0.gguf"
    write_qwen3_gguf(path, spec, weights)

    got_spec, got = load_gguf(path, "tiny-qwen3")
    for f in ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "rope_theta", "tie_embeddings", "qk_norm"):
        assert getattr(got_spec, f) == getattr(spec, f), f
    assert got_spec.eos_token_id == 255
    assert set(got) == set(weights)
    for k, v in weights.items():
        if v.ndim == 1:
            assert torch.equal(got[k], v), k                # F32: exact, no permutation
        else:                                               # Q8_0: 8-bit blocks of 32
            want = torch.from_numpy(gguf.dequantize(
                gguf.quantize(v.numpy(), gguf.GGMLQuantizationType.Q8_0),
                gguf.GGMLQuantizationType.Q8_0)).reshape(v.shape)
            assert torch.equal(got[k], want), k
            assert (got[k] - v).abs().max() <= v.abs().max() / 100

    tok = tokenizers.from_gguf(path)
    assert tok.decode(tok.encode("héllo, wörld 42!")) == "héllo, wörld 42!"
    assert tok.encode("<|end|>") == [255]

    out = build_engine(BuildOptions(model="tiny-qwen3", checkpoint=str(path), kv_cache="int4-bdr",
                                    page_size=16, max_seq_len=128, compile_kernels=False,
                                    output=str(tmp_path / "eng")), log=lambda m: None,
                       progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["kind"] == "gguf" and len(cfg["source"]["sha256"]) == 64
    eng = LLMEngine.from_engine_dir(out, device="cpu")
    assert torch.equal(eng.model.embed, got["model.embed_tokens.weight"].bfloat16().float())
    assert eng.eos_token_ids == {255}
    eng.add_request("a", "hi", __import__("sawtrt.engine.sampling", fromlist=["x"])
                    .SamplingParams(max_tokens=4, ignore_eos=True))
    n = 0
    while eng.has_unfinished():
        n += sum(len(o.new_token_ids) for o in eng.step())
    assert n == 4
