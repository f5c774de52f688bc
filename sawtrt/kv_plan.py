"""How many tokens and sequences fit in a KV memory budget, per policy."""
from __future__ import annotations

import re

from .models.specs import ModelSpec
from .spec import DEFAULT_PAGE_SIZE, KVPolicy, PageLayout

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_POLICIES = ("bf16", "int8", "int4", "int4-bdr")


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '1.5e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _tidy(x: float):
    return int(x) if x == int(x) else round(x, 1)


def plan(spec: ModelSpec, memory_bytes: int, seq_len: int, policies=DEFAULT_POLICIES,
         page_size: int = DEFAULT_PAGE_SIZE) -> list[dict]:
    rows = []
    for text in policies:
        layout = PageLayout(KVPolicy.parse(text), spec.head_dim, spec.num_kv_heads, page_size)
        per_token = layout.bytes_per_token(spec.num_layers)
        page_all_layers = layout.pool_page_bytes(spec.num_layers)
        pages = memory_bytes // page_all_layers
        pages_per_seq = -(-seq_len // page_size)
        rows.append({
            "policy": str(layout.policy), "bytes_per_token": per_token,
            # mean over layers for per-layer page formats
            "bytes_per_token_per_kv_head": _tidy(per_token / (spec.num_layers
                                                              * spec.num_kv_heads)),
            "pages": pages,
            "tokens": pages * page_size, "sequences": pages // pages_per_seq,
        })
    base = next((r for r in rows if r["policy"] == "bf16"), rows[0])["bytes_per_token"]
    for r in rows:
        r["tokens_vs_bf16"] = round(base / r["bytes_per_token"], 3)
    return rows
