"""PNG plot of perplexity per scheme, one panel per model (matplotlib, Agg backend)."""
from __future__ import annotations


def plot(results: list[dict], path, title: str = "Perplexity vs KV-cache policy") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "#777777", "runtime": "#1f77b4", "hf-paged": "#2ca02c",
              "fake": "#ff7f0e"}
    counts = [len(r["results"]) for r in results]
    fig, axes = plt.subplots(1, len(results), squeeze=False,
                             figsize=(min(22.0, max(7.0, 0.45 * sum(counts) + 2.5 * len(results))), 6.0),
                             gridspec_kw={"width_ratios": [max(c, 3) for c in counts]})
    for ax, res in zip(axes[0], results):
        rows = res["results"]
        x = range(len(rows))
        bars = ax.bar(x, [r["ppl"] for r in rows], color=[colors.get(r["path"], "k") for r in rows])
        bf16 = next((r["ppl"] for r in rows if r["scheme"] == "bf16" and r["path"] != "fake"), None)
        if bf16:
            ax.axhline(bf16, color="k", lw=0.8, ls="--")
            ax.axhline(bf16 * 1.02, color="r", lw=0.8, ls=":", label="bf16 + 2 %")
        for b, r in zip(bars, rows):
            if "vs_bf16_pct" in r:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                        f"{r['vs_bf16_pct']:+.1f}%", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['scheme']}\n[{r['path']}]" for r in rows], rotation=60,
                           ha="right", fontsize=7)
        lo, hi = min(r["ppl"] for r in rows), max(r["ppl"] for r in rows)
        if hi > 3 * lo:                      # a collapsed policy (Gemma's naive int4): log axis
            ax.set_yscale("log")
        ax.set_ylim(lo * 0.9, hi * 1.1)
        ax.set_ylabel("perplexity" + (" (log)" if hi > 3 * lo else ""))
        ax.set_title(f"{res['model']}: {res['tokens']} tok/source, W={res['window']}", fontsize=9)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
        if ax is axes[0][0]:
            ax.legend(handles + ax.get_legend_handles_labels()[0],
                      list(colors) + ax.get_legend_handles_labels()[1], fontsize=7,
                      loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto(results: list[dict], path, title: str = "Held-out KV-cache frontier") -> None:
    """Bytes per token vs held-out ppl change (mean ± sd over sign realisations) of each policy
    of `sawtrt eval` held-out results, one panel per model; the Pareto front (no policy both
    smaller and more accurate) joined by a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), squeeze=False, figsize=(6.5 * len(results), 5.0))
    for ax, res in zip(axes[0], results):
        pts = sorted(((r["bytes_per_token"], r["delta"]["mean"], r["delta"]["sd"], r["policy"])
                      for r in res["results"]), key=lambda p: (p[0], p[1]))
        front, best = [], float("inf")
        for p in pts:
            if p[1] < best:
                front.append(p)
                best = p[1]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    fmt="o", color="#1f77b4", ecolor="#9ecae1", capsize=3)
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="#d62728", lw=1,
                label="Pareto front")
        for b, d, _, name in pts:
            ax.annotate(name.replace(",", ",\u200b"), (b, d), fontsize=6, xytext=(4, 3),
                        textcoords="offset points")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV cache bytes per token (all layers)")
        ax.set_ylabel("held-out perplexity vs bf16 (%)")
        ax.set_title(f"{res['model']} ({res['path']}): {res['scored_tokens']} held-out tokens, "
                     f"{res['seeds']} sign realisations", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
