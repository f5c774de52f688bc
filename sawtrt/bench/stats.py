"""Latency distributions as every benchmark reports them: mean, p50, p90, p99, max."""
from __future__ import annotations

import statistics


def percentile(xs, q: float):
    """Linear-interpolated q-quantile (q in [0, 1]) of xs; None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def dist(xs) -> dict:
    xs = list(xs)
    return {"mean": statistics.fmean(xs) if xs else None, "p50": percentile(xs, 0.5),
            "p90": percentile(xs, 0.9), "p99": percentile(xs, 0.99),
            "max": max(xs) if xs else None}
