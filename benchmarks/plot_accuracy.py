"""docs/accuracy.png from `sawtrt eval --json` files: perplexity per KV policy, one panel per model,
the sign realisations of a policy (`,seed=S`) pooled into mean ± sd.

    python benchmarks/plot_accuracy.py OUT.png RESULT.json [RESULT.json ...]

Prints the table it plots (policy, path, realisations, mean ppl, % vs bf16 ± sd).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict

_SEED = re.compile(r",seed=\d+")


def pooled(paths: list[str]) -> dict:
    """{model: {(policy without seed, path): [ppl, ...]}} in first-seen order; a run repeated in
    two files (same scheme, path and ppl) counts once."""
    out: dict = defaultdict(dict)
    seen = set()
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        for res in data if isinstance(data, list) else [data]:
            for r in res["results"]:
                key = (res["model"], r["scheme"], r["path"])
                if key in seen:
                    continue
                seen.add(key)
                pol = _SEED.sub("", r["scheme"])
                out[res["model"]].setdefault((pol, r["path"]), []).append(r["ppl"])
    return out


def table(groups: dict) -> list[tuple]:
    rows = []
    for model, pols in groups.items():
        ref = [x for (k, _), v in pols.items() if k == "bf16" for x in v]
        bf16 = statistics.mean(ref) if ref else None
        for (pol, path), v in pols.items():
            mean = statistics.mean(v)
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            pct = 100 * (mean / bf16 - 1) if bf16 else float("nan")
            pct_sd = 100 * sd / bf16 if bf16 else float("nan")
            rows.append((model, pol, path, len(v), mean, pct, pct_sd, sd))
    return rows


def plot(rows: list[tuple], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r[0] for r in rows))
    counts = [sum(r[0] == m for r in rows) for m in models]
    fig, axes = plt.subplots(1, len(models), squeeze=False, figsize=(4 + 1.1 * sum(counts), 5.5),
                             gridspec_kw={"width_ratios": counts})
    for ax, model in zip(axes[0], models):
        mine = sorted((r for r in rows if r[0] == model), key=lambda r: (r[1] != "bf16", -r[4]))
        x = range(len(mine))
        bars = ax.bar(x, [r[4] for r in mine], yerr=[r[7] for r in mine], capsize=3,
                      color=["#777777" if r[1] == "bf16" else "#1f77b4" for r in mine])
        base = next(r[4] for r in mine if r[1] == "bf16")
        ax.axhline(base * 1.02, color="r", lw=0.8, ls=":", label="bf16 + 2 %")
        for b, r in zip(bars, mine):
            if r[1] != "bf16":
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + r[7],
                        f"{r[5]:+.1f}%\n(n={r[3]})", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels([r[1] for r in mine], rotation=30, ha="right", fontsize=7)
        lo, hi = min(r[4] for r in mine), max(r[4] for r in mine)
        ax.set_ylim(lo * 0.95, hi * 1.08)
        ax.set_ylabel("perplexity (mean over sign realisations ± sd)")
        ax.set_title(f"{model} [{mine[0][2]} path]", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Perplexity vs KV-cache policy (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise SystemExit(__doc__)
    rows = table(pooled(argv[1:]))
    for r in rows:
        print(f"{r[0]:14s} {r[1]:48s} {r[2]:9s} n={r[3]:2d} ppl {r[4]:8.3f} "
              f"{r[5]:+7.2f} % ± {r[6]:.2f}")
    plot(rows, argv[0])


if __name__ == "__main__":
    main()
