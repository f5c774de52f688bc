"""Sampling parameters of one request (the public contract of the runtime)."""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TOKENS_LIMIT = 1 << 20      # more than any context we serve; larger is certainly a mistake
MAX_TOP_K = 1 << 20
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    max_tokens   new tokens at most (finish_reason "length")
    temperature  0 = greedy; otherwise logits / temperature
    top_k        keep the k most likely tokens (0 = all)
    top_p        keep the smallest set whose probability reaches top_p (1 = all)
    seed         per-request RNG seed (None: drawn from the engine's RNG)
    stop         strings that end generation (finish_reason "stop"); not included in the text
    ignore_eos   keep going past the EOS token
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        """Raise ValueError with a clear message for a bad value; returns self."""
        def bad(msg):
            raise ValueError(f"invalid sampling params: {msg}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            bad(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 0:
            bad(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            bad(f"max_tokens={self.max_tokens} is absurd (limit {MAX_TOKENS_LIMIT})")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE:
            bad(f"temperature={self.temperature} is absurd (limit {MAX_TEMPERATURE})")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            bad(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if self.top_k > MAX_TOP_K:
            bad(f"top_k={self.top_k} is absurd (limit {MAX_TOP_K})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            bad(f"seed must be None or an int in [0, 2^63), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            bad(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad(f"stop strings must be non-empty str, got {s!r}")
        if not isinstance(self.ignore_eos, bool):
            bad(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
