"""Architectures sawtrt knows by name, with their real layer/head/dim counts.

Numbers are from each model's published config.json. `from_hf_config` builds a spec for any
Llama/Qwen3-style checkpoint directory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str                 # "qwen3" | "llama" | "gemma3"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    max_position: int
    qk_norm: bool = False     # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _qwen3(name, layers, hidden, heads, kv, inter, tie):
    return ModelSpec(name, "qwen3", layers, hidden, heads, kv, 128, inter, 151936, 1e6, 1e-6,
                     tie, 40960, qk_norm=True, bos_token_id=151643, eos_token_id=151645)


MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    _qwen3("qwen3-0.6b", 28, 1024, 16, 8, 3072, True),
    _qwen3("qwen3-1.7b", 28, 2048, 16, 8, 6144, True),
    _qwen3("qwen3-4b", 36, 2560, 32, 8, 9728, True),
    _qwen3("qwen3-8b", 36, 4096, 32, 8, 12288, False),
    ModelSpec("smollm2-135m", "llama", 30, 576, 9, 3, 64, 1536, 49152, 100000.0, 1e-5, True,
              8192, bos_token_id=1, eos_token_id=2),
    ModelSpec("gemma3-270m", "gemma3", 18, 640, 4, 1, 256, 2048, 262144, 1e6, 1e-6, True,
              32768, qk_norm=True, bos_token_id=2, eos_token_id=1),
)}


class UnknownModel(KeyError):
    def __str__(self):
        return f"unknown model {self.args[0]!r}; known: {', '.join(sorted(MODELS))}"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise UnknownModel(name) from None


def from_hf_config(cfg: dict, name: str = "custom") -> ModelSpec:
    """Spec from a Hugging Face config.json dict (Llama / Qwen3 families)."""
    mt = cfg.get("model_type", "llama")
    arch = {"qwen3": "qwen3", "llama": "llama", "mistral": "llama", "gemma3_text": "gemma3"}.get(mt)
    if arch is None:
        raise ValueError(f"unsupported model_type {mt!r} (supported: llama, mistral, qwen3)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    eos = cfg.get("eos_token_id")
    # transformers >= 5 nests rope settings in rope_parameters; older configs keep rope_theta at
    # the top and scaling in rope_scaling. Only plain RoPE is implemented: refuse the others.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default"
                                          else rope)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
                         "supported (plain RoPE only)")
    return ModelSpec(
        name=name, arch=arch, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        rope_theta=float(theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        qk_norm=arch in ("qwen3", "gemma3"), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos)
