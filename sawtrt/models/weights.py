"""Weight loaders: HF safetensors directories, GGUF files, and explicit random weights.

Every loader returns a dict of torch tensors under Hugging Face names
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so the model and the engine builder see one
naming scheme whatever the source.

GGUF notes: tensors are dequantized with the `gguf` package (Q4_1, Q8_0, F16, ... -> fp32).
llama.cpp's converter permutes the rows of Q and K of Llama-architecture models (it stores them
for the interleaved rotary convention); `_unpermute` undoes that so the weights match the HF
"rotate half" convention used here. Qwen3 GGUFs are stored unpermuted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .specs import ModelSpec, from_hf_config


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model."""


# -- safetensors ------------------------------------------------------------------------------
def safetensors_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {str(path)!r}")
    return files


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        out.update(load_file(str(f)))
    return out


def spec_from_hf_dir(path: str | Path, name: str) -> ModelSpec:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json")
    try:
        return from_hf_config(json.loads(cfg.read_text()), name)
    except KeyError as e:
        raise CheckpointError(f"{cfg}: missing field {e}") from None


# -- GGUF -------------------------------------------------------------------------------------
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def gguf_spec(reader, name: str) -> ModelSpec:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen3"):
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (llama, qwen3)")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"GGUF RoPE scaling {scaling!r} is not supported (plain RoPE only)")
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    head_dim = int(g("attention.key_length", 0) or hidden // heads)
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelSpec(
        name=name, arch=arch, num_layers=int(g("block_count")), hidden_size=hidden,
        num_heads=heads, num_kv_heads=int(g("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(g("feed_forward_length")), vocab_size=int(vocab),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings="output.weight" not in names, max_position=int(g("context_length", 4096)),
        qk_norm=arch == "qwen3",
        bos_token_id=_maybe_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_maybe_int(_field(reader, "tokenizer.ggml.eos_token_id")))


def _maybe_int(v):
    return None if v is None else int(v)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: rows (head, pair, 2) -> (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def load_gguf(path: str | Path, name: str = "custom", progress: bool = False
              ) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """(spec, fp32 weights under HF names) from a GGUF file."""
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    reader = gguf.GGUFReader(str(path))
    spec = gguf_spec(reader, name)
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc="dequantize GGUF", unit="tensor")
    out: dict[str, torch.Tensor] = {}
    for t in tensors:
        if t.name in _GGUF_GLOBAL:
            hf = _GGUF_GLOBAL[t.name]
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _GGUF_LAYER:
                raise CheckpointError(f"unexpected GGUF tensor {t.name!r}")
            hf = f"model.layers.{idx}.{_GGUF_LAYER[rest]}"
        elif t.name == "rope_freqs.weight":
            raise CheckpointError("GGUF with rope scaling factors is not supported")
        else:
            raise CheckpointError(f"unexpected GGUF tensor {t.name!r}")
        arr = gguf.dequantize(t.data, t.tensor_type)
        shape = [int(s) for s in reversed(t.shape)]      # GGUF lists dims fastest-first
        w = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
        if spec.arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, spec.num_heads)
        elif spec.arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, spec.num_kv_heads)
        out[hf] = w
    return spec, out


# -- random weights ---------------------------------------------------------------------------
def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape (HF names)."""
    d, h, hq, hkv, f = spec.head_dim, spec.hidden_size, spec.num_heads, spec.num_kv_heads, \
        spec.intermediate_size
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (hq * d, h), p + "self_attn.k_proj.weight": (hkv * d, h),
            p + "self_attn.v_proj.weight": (hkv * d, h), p + "self_attn.o_proj.weight": (h, hq * d),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f)})
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
    return shapes


def random_weights(spec: ModelSpec, seed: int = 0, dtype=torch.bfloat16, device=None
                   ) -> dict[str, torch.Tensor]:
    """Random weights of the real shapes (deterministic for a seed on one device type).

    Matrices ~ N(0, 1/fan_in) (keeps activations O(1) through the depth), norms ~ 1 + N(0, 0.1)
    so q/k-norm and the residual stream are exercised with non-trivial weights. Embeddings
    ~ N(0, 1/hidden): larger ones dominate the residual stream and the tied head, and the model
    just repeats its last token.
    """
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    out = {}
    for name, shape in weight_shapes(spec).items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen, device=device) * shape[1] ** -0.5
        else:
            t = torch.randn(shape, generator=gen, device=device) * shape[1] ** -0.5
        out[name] = t.to(dtype)
    return out


def check_weights(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first missing or mis-shaped tensor."""
    for name, shape in weight_shapes(spec).items():
        if name not in weights:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(weights[name].shape)}, model expects "
                                  f"{shape}")
