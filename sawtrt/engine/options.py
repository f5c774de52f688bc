"""Run-time choices of an engine that its directory does not fix: the KV policy override, the KV
pool budget and the scheduler's limits. One definition for every way an engine is started:
`sawtrt bench throughput` (in process), `sawtrt serve` / `sawtrt bench serve --engine` (inside the
Triton Python backend, where they travel as config.pbtxt string parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

GiB = 1 << 30
# the --scheduling choices as EngineOptions.async_scheduling
SCHEDULING = {"auto": None, "async": True, "sync": False}


def _bool(v) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


@dataclass(frozen=True)
class EngineOptions:
    kv_policy: str | None = None              # e.g. "int4-bdr:h=32"; None: the engine's own
    kv_memory_gib: float | None = None        # KV pool budget; None: the engine's default
    max_num_batched_tokens: int | None = None  # tokens per step (chunked prefill)
    max_num_seqs: int | None = None           # running sequences; None: the engine's max_batch
    prefill_kv: str | None = None             # "fresh" / "cache" / "auto" (None: auto), see
                                              # CausalLM: what prompt tokens attend to
    async_scheduling: bool | None = None      # schedule step N+1 while the GPU runs step N
                                              # (None: on for CUDA, off on CPU); LLMEngine

    def __post_init__(self):
        if self.kv_memory_gib is not None and not self.kv_memory_gib > 0:
            raise ValueError(f"kv_memory_gib must be > 0, got {self.kv_memory_gib}")
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.prefill_kv not in (None, "fresh", "cache", "auto"):
            raise ValueError(f"prefill_kv must be fresh, cache or auto, got {self.prefill_kv!r}")

    def engine_kwargs(self) -> dict:
        """Keyword arguments of LLMEngine.from_engine_dir (defaults left out)."""
        kw = {}
        if self.kv_policy:
            kw["kv_policy"] = self.kv_policy
        if self.kv_memory_gib is not None:
            kw["kv_memory_bytes"] = int(self.kv_memory_gib * GiB)
        if self.max_num_batched_tokens is not None:
            kw["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        if self.prefill_kv is not None:
            kw["prefill_kv"] = self.prefill_kv
        if self.async_scheduling is not None:
            kw["async_scheduling"] = self.async_scheduling
        return kw

    def load(self, engine_dir, device=None):
        from .llm_engine import LLMEngine
        return LLMEngine.from_engine_dir(engine_dir, device=device, **self.engine_kwargs())

    def to_params(self) -> dict[str, str]:
        """String parameters (Triton's config.pbtxt); "" means the default."""
        return {f.name: "" if getattr(self, f.name) is None else str(getattr(self, f.name))
                for f in fields(self)}

    @classmethod
    def from_params(cls, params: dict) -> "EngineOptions":
        """Inverse of to_params; missing or empty values are defaults."""
        conv = {"kv_policy": str, "kv_memory_gib": float, "max_num_batched_tokens": int,
                "max_num_seqs": int, "prefill_kv": str, "async_scheduling": _bool}
        kw = {}
        for name, f in conv.items():
            v = params.get(name, "")
            if v not in ("", None):
                try:
                    kw[name] = f(v)
                except ValueError:
                    raise ValueError(f"engine option {name}: cannot read {v!r}") from None
        return cls(**kw)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.to_params().items() if v]
        return ", ".join(parts) or "engine defaults"
