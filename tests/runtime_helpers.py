"""Shared by the model / runtime / scheduler tests: tiny engines and a transformers oracle whose
attention sees K/V stored exactly as our cache stores them.

The oracle: transformers' own Llama / Qwen3 modules (fp32) with an attention function that
passes K and V through the cache's storage rule before eager attention — bf16 rounding for the
bf16 policy; rotate -> token-wise quantize -> dequantize -> inverse rotate for the int policies
(sawtrt.quant / sawtrt.hadamard, the spec's numerics). Everything else (embeddings, norms, q/k
norm, RoPE, GQA, MLP, tied head) is transformers' code, independent of sawtrt.models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from sawtrt import hadamard, quant
from sawtrt.build import BuildOptions, build_engine
from sawtrt.models.specs import ModelSpec
from sawtrt.models.weights import random_weights
from sawtrt.spec import KVPolicy, PageLayout


def tiny_spec(arch: str = "llama", **kw) -> ModelSpec:
    base = dict(name=f"tiny-{arch}", arch=arch, num_layers=2, hidden_size=64, num_heads=4,
                num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=True, max_position=512,
                qk_norm=arch == "qwen3", bos_token_id=None, eos_token_id=None)
    base.update(kw)
    return ModelSpec(**base)


def build_tiny(tmp_path, spec: ModelSpec, kv_cache="bf16", page_size=16, max_batch=64,
               max_seq_len=128, seed=0, name="tiny"):
    return build_engine(BuildOptions(model=name, spec=spec, random_weights=True, seed=seed,
                                     kv_cache=kv_cache, page_size=page_size, max_batch=max_batch,
                                     max_seq_len=max_seq_len, compile_kernels=False,
                                     output=str(tmp_path / f"{name}-{kv_cache}")),
                        log=lambda m: None, progress=False)


def digests(d):
    """relative path -> sha256 of every file under d."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def hf_checkpoint(path, spec, seed=3):
    """A tiny HF-style checkpoint dir: config.json, model.safetensors, tokenizer.json."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    path.mkdir()
    cfg = {"model_type": "qwen3", "num_hidden_layers": spec.num_layers,
           "hidden_size": spec.hidden_size, "num_attention_heads": spec.num_heads,
           "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
           "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size,
           "rope_theta": spec.rope_theta, "rms_norm_eps": spec.rms_norm_eps,
           "tie_word_embeddings": True, "max_position_embeddings": 256, "eos_token_id": 0}
    (path / "config.json").write_text(json.dumps(cfg))
    w = random_weights(spec, seed=seed, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    return w


# -- the transformers oracle -------------------------------------------------------------------
def kv_storage_fn(policy: KVPolicy, head_dim: int, kv_dtype=None):
    """x [..., D] -> x as our cache returns it (original basis; the cache quantizes and
    dequantizes in fp32, cast back to x's dtype). kv_dtype: round K/V to this dtype first (a bf16
    model hands the cache bf16 K/V)."""
    layout = PageLayout(policy, head_dim, 1, 16)
    pol = layout.policy
    signs = pol.signs(head_dim)

    def store(x: torch.Tensor, rotate: bool) -> torch.Tensor:
        dtype = x.dtype
        if kv_dtype is not None:
            x = x.to(kv_dtype)
        x = quant.sanitize(x)
        if rotate:
            x = hadamard.rotate(x, pol.rotation_block, signs)
        if not pol.quantized:
            y = x.bfloat16().float()
        else:
            codes, s, m = quant.quantize(x, pol.bits)
            y = quant.dequantize(codes, s, m)
        if rotate:
            y = hadamard.inverse_rotate(y, pol.rotation_block, signs)
        return y.to(dtype)

    return (lambda k: store(k, pol.rotated)), (lambda v: store(v, pol.rotated and pol.rotate_v))


_REGISTERED: dict[str, str] = {}


def attn_impl_for(policy: KVPolicy, head_dim: int, kv_dtype=None) -> str:
    """Name of a registered transformers attention function storing K/V like `policy`."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    name = f"sawtrt_{str(policy).replace(':', '_').replace(',', '_').replace('=', '')}_{head_dim}"
    name += f"_{str(kv_dtype).split('.')[-1]}" if kv_dtype is not None else ""
    if name not in _REGISTERED:
        fns: dict = {}      # layer policy -> (fk, fv): per-layer page formats (int8=...)

        def attention(module, query, key, value, attention_mask, **kw):
            pol = policy.for_layer(module.layer_idx)
            if pol not in fns:
                fns[pol] = kv_storage_fn(pol, head_dim, kv_dtype)
            fk, fv = fns[pol]
            return eager_attention_forward(module, query, fk(key), fv(value), attention_mask, **kw)

        AttentionInterface.register(name, attention)
        try:                      # transformers >= 4.53 builds masks per implementation
            from transformers.masking_utils import AttentionMaskInterface, eager_mask
            AttentionMaskInterface.register(name, eager_mask)
        except ImportError:
            pass
        _REGISTERED[name] = name
    return name


def hf_model(spec: ModelSpec, weights: dict, policy: KVPolicy | str = "bf16", kv_dtype=None,
             dtype: torch.dtype = torch.float32):
    """transformers' model for `spec` (in `dtype`, fp32 or fp64) holding `weights`, attention
    storing K/V like our cache under `policy` (K/V rounded to kv_dtype first when given)."""
    import transformers
    policy = KVPolicy.parse(policy) if isinstance(policy, str) else policy
    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                  intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                  head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
                  max_position_embeddings=spec.max_position,
                  tie_word_embeddings=spec.tie_embeddings, attention_bias=False,
                  rope_theta=spec.rope_theta)
    if spec.arch == "qwen3":
        cfg = transformers.Qwen3Config(**common)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common, mlp_bias=False)
        cls = transformers.LlamaForCausalLM
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta",
                                                              getattr(cfg, "rope_theta", None))
    assert theta == spec.rope_theta, f"transformers config dropped rope_theta ({theta})"
    cfg._attn_implementation = attn_impl_for(policy, spec.head_dim, kv_dtype)
    model = cls(cfg).to(dtype).eval()
    sd = {k: v.to(dtype) for k, v in weights.items()}
    if spec.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens with transformers' own KV cache (no EOS stop)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    ids = torch.tensor([prompt_ids])
    out = []
    for _ in range(n):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        tok = int(torch.argmax(logits))
        out.append(tok)
        ids = torch.tensor([[tok]])
    return out


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of one causal forward, in the model's dtype."""
    return model(input_ids=torch.tensor([ids])).logits[0]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def replace(spec: ModelSpec, **kw) -> ModelSpec:
    return dataclasses.replace(spec, **kw)


def drive(engine, reqs, arrivals=8, aborts=None) -> dict:
    """Run (rid, prompt, SamplingParams) requests through engine.step(), `arrivals` added
    before each call; aborts: {step() call: [rid]} aborted before that call. Returns
    {rid: [StepOutput]} after checking the stream contract (one finished output per request,
    last; its token count the sum of the deltas) and that every page came back."""
    outs = {rid: [] for rid, _, _ in reqs}
    pending = list(reqs)
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(arrivals):
            if pending:
                engine.add_request(*pending.pop(0))
        for rid in (aborts or {}).get(step, []):
            engine.abort_request(rid)
        for o in engine.step():
            assert not (outs[o.request_id] and outs[o.request_id][-1].finished), \
                f"{o.request_id}: output after its finished output"
            outs[o.request_id].append(o)
        step += 1
        assert step < 10_000
    for rid, os_ in outs.items():
        assert os_ and os_[-1].finished, f"{rid} never finished"
        assert os_[-1].num_output_tokens == sum(len(o.new_token_ids) for o in os_)
    assert engine.kv_cache_usage()["used_pages"] == 0
    engine.block_manager.check([])
    assert not engine.has_unfinished() and engine._inflight is None
    return outs


def stream_summary(outputs) -> tuple:
    """(tokens, text, finish reason) of one request's StepOutputs."""
    return ([t for o in outputs for t in o.new_token_ids], "".join(o.new_text for o in outputs),
            outputs[-1].finish_reason)
