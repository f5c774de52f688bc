"""The engine directory's config.json: one versioned record of what `sawtrt build` made.

Layout of an engine directory:
    config.json            this record (format "sawtrt-engine", version ENGINE_FORMAT_VERSION;
                           the KV policy stored once, as its text)
    model.safetensors      weights under HF names, in `weights.dtype` (absent for random weights,
                           which are regenerated from `weights.seed` at load)
    tokenizer.json         byte-level BPE (tokenizers format), when the model has a vocabulary
    tokenizer_config.json  tokenizer kind and special ids (+ chat template)
    kv_calibration.safetensors  K statistics behind the policy's `center` / `balance` / `whiten`
                           (sawtrt.models.kv_transform), only for such policies
    lib/                   the compiled kernel library, when nvcc was there at build time
    triton_model_repo/     Triton model repository (written by sawtrt.serving), when available
    .sawtrt-build.json     what each build step was made from (sawtrt.build.state); the build's,
                           not read at load
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models.specs import ModelSpec
from ..spec import KVPolicy, PageLayout, PolicyError

ENGINE_FORMAT = "sawtrt-engine"
ENGINE_FORMAT_VERSION = 2
# version 1 stored the policy three times (kv_policy as fields, kv_policy_str, page_layout.policy);
# version 2 stores it once, as the text KVPolicy.parse reads (kv_policy). Both are read.
READABLE_VERSIONS = (1, 2)


class EngineConfigError(ValueError):
    pass


@dataclass
class EngineConfig:
    model: ModelSpec
    layout: PageLayout
    max_batch: int
    max_seq_len: int
    weights: dict = field(default_factory=dict)     # {"format", "file", "dtype", "sha256", ...}
    tokenizer: dict = field(default_factory=dict)   # {"kind": "bpe"|"bytes", "sha256": ...}
    kernels: dict = field(default_factory=dict)     # {"library": path|None, "archs": [...], ...}
    source: dict = field(default_factory=dict)      # where the weights came from
    extra: dict = field(default_factory=dict)       # written by other tools (plan, triton repo)
    kv_calibration: dict = field(default_factory=dict)  # {"file", "sha256", "source", ...}

    @property
    def policy(self) -> KVPolicy:
        return self.layout.policy

    def to_dict(self) -> dict:
        page_layout = self.layout.to_dict()
        del page_layout["policy"]                  # stored once, as kv_policy
        return {"format": ENGINE_FORMAT, "version": ENGINE_FORMAT_VERSION,
                "model": self.model.to_dict(), "kv_policy": str(self.layout.policy),
                "page_layout": page_layout,
                "limits": {"max_batch": self.max_batch, "max_seq_len": self.max_seq_len},
                "weights": self.weights, "tokenizer": self.tokenizer, "kernels": self.kernels,
                "source": self.source, **({"extra": self.extra} if self.extra else {}),
                **({"kv_calibration": self.kv_calibration} if self.kv_calibration else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        if d.get("format") != ENGINE_FORMAT:
            raise EngineConfigError("not a sawtrt engine config (format field missing/wrong)")
        if d.get("version") not in READABLE_VERSIONS:
            raise EngineConfigError(f"engine format version {d.get('version')} is not supported "
                                    f"by this sawtrt (reads {READABLE_VERSIONS}); rebuild "
                                    "the engine with `sawtrt build`")
        model = ModelSpec.from_dict(d["model"])
        try:
            layout = _layout(d)
            layout.policy.check_layers(model.num_layers)   # per-layer pages name its layers
        except PolicyError as e:
            raise EngineConfigError(str(e)) from None
        return cls(model=model, layout=layout,
                   max_batch=int(d["limits"]["max_batch"]),
                   max_seq_len=int(d["limits"]["max_seq_len"]), weights=d.get("weights", {}),
                   tokenizer=d.get("tokenizer", {}), kernels=d.get("kernels", {}),
                   source=d.get("source", {}), extra=d.get("extra", {}),
                   kv_calibration=d.get("kv_calibration", {}))

    @classmethod
    def load(cls, engine_dir) -> "EngineConfig":
        p = Path(engine_dir) / "config.json"
        if not p.is_file():
            raise EngineConfigError(f"{str(engine_dir)!r} is not an engine directory (no "
                                    "config.json); build one with `sawtrt build`")
        return cls.from_dict(json.loads(p.read_text()))


def _layout(d: dict) -> PageLayout:
    if d["version"] == 1:
        layout = PageLayout.from_dict(d["page_layout"])
        if layout.policy != KVPolicy.from_dict(d["kv_policy"]).resolve(layout.head_dim):
            raise EngineConfigError("kv_policy and page_layout.policy disagree")
        return layout
    return PageLayout.from_dict({**d["page_layout"], "policy": d["kv_policy"]})
