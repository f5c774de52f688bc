"""Attention error of each KV policy on synthetic keys with outlier channels.

Keys are N(0, 1) plus a few "massive" channels carrying a fixed offset 20-100x the others'
scale (the pattern seen in real K after RoPE); queries and values are N(0, 1). Each trial
writes K/V through the paged reference cache and reports ||out - ref|| / ||ref|| against fp32
attention on the unquantized tensors. `python -m sawtrt.studies.outliers` prints the table
quoted in docs/accuracy-synthetic.md; tests/test_outliers.py asserts its ordering.
"""
from __future__ import annotations

import math
import statistics

import torch

from ..kv_cache import new_pool, write_kv
from ..reference import dense_attention, paged_attention
from ..spec import KVPolicy, PageLayout

POLICIES = ("bf16", "int8", "int4", "int4-bdr:h=16", "int4-bdr:h=64", "int4-bdr:h=128")
OUTLIER_OFFSETS = (20.0, -40.0, 70.0, -100.0)


def trial(seed: int, policies=POLICIES, tokens=300, kv_heads=4, q_heads=16, head_dim=128,
          new_tokens=8, page_size=16) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g)
    channels = torch.randperm(head_dim, generator=g)[: len(OUTLIER_OFFSETS)]
    k[:, :, channels] += torch.tensor(OUTLIER_OFFSETS)
    q = torch.randn(new_tokens, q_heads, head_dim, generator=g)
    ref = dense_attention(q, k, v, tokens - new_tokens, 1 / math.sqrt(head_dim))
    pages = -(-tokens // page_size)
    out = {}
    for text in policies:
        layout = PageLayout(KVPolicy.parse(text), head_dim, kv_heads, page_size)
        pool = new_pool(layout, 1, 2 * pages)[0]
        table = torch.randperm(2 * pages, generator=g)[:pages].int()
        pos = torch.arange(tokens)
        write_kv(pool, layout, k, v, table[pos // page_size] * page_size + pos % page_size)
        o = paged_attention(q, pool, layout, table[None], torch.tensor([tokens]),
                            torch.tensor([new_tokens]))
        out[text] = ((o - ref).norm() / ref.norm()).item()
    return out


def study(seeds=range(20), **kw) -> dict[str, dict[str, float]]:
    runs = [trial(s, **kw) for s in seeds]
    return {p: {"mean": statistics.mean(r[p] for r in runs),
                "min": min(r[p] for r in runs), "max": max(r[p] for r in runs),
                "mean_vs_int4": statistics.mean(r[p] / r["int4"] for r in runs)}
            for p in runs[0]}


if __name__ == "__main__":
    print(f"{'policy':<16}{'mean':>8}{'min':>8}{'max':>8}{'vs int4':>9}")
    for p, r in study().items():
        print(f"{p:<16}{r['mean']:>8.3f}{r['min']:>8.3f}{r['max']:>8.3f}{r['mean_vs_int4']:>9.3f}")
