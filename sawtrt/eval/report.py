"""Markdown tables from `sawtrt eval --json` files (used to write docs/accuracy.md).

    python -m sawtrt.eval.report RESULT.json [RESULT.json ...] [--plot OUT.png]
"""
from __future__ import annotations

import json
import sys


def load(path) -> list[dict]:
    with open(path) as f:
        d = json.load(f)
    return d["models"] if "models" in d else [d]


def ppl_table(res: dict, ref_scheme: str = "bf16") -> str:
    rows = res["results"]
    base = {r["scheme"]: r["ppl"] for r in rows if r["path"] != "fake"}
    fp32 = base.get("fp32")
    bf16 = base.get(ref_scheme)
    srcs = list(rows[0]["per_source"])
    out = [f"| scheme | path | ppl | vs fp32 | vs bf16 | " + " | ".join(srcs)
           + " | KV bytes/token |",
           "|---|---|---:|---:|---:|" + "---:|" * len(srcs) + "---:|"]
    for r in rows:
        vs32 = f"{100 * (r['ppl'] / fp32 - 1):+.2f} %" if fp32 else ""
        vs16 = f"{100 * (r['ppl'] / bf16 - 1):+.2f} %" if bf16 else ""
        out.append(f"| `{r['scheme']}` | {r['path']} | {r['ppl']:.3f} | {vs32} | {vs16} | "
                   + " | ".join(f"{r['per_source'][s]:.3f}" for s in srcs)
                   + f" | {r['bytes_per_token'] or '—'} |")
    return "\n".join(out)


def greedy_table(res: dict) -> str:
    g = res.get("greedy") or []
    if not g:
        return ""
    srcs = sorted({x["source"] for x in g})
    out = ["| scheme | path | " + " | ".join(f"{s}: first divergence / identical" for s in srcs)
           + " |", "|---|---|" + "---|" * len(srcs)]
    seen = []
    for x in g:
        if x["scheme"] not in seen:
            seen.append(x["scheme"])
    for s in seen:
        cells = []
        path = ""
        for src in srcs:
            x = next(y for y in g if y["scheme"] == s and y["source"] == src)
            path = x["path"]
            fd = x.get("first_divergence")
            cells.append(f"{'—' if fd is None else fd} / {x.get('identical_pct', 0):.0f} %")
        out.append(f"| `{s}` | {path} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def outlier_table(res: dict) -> str:
    rows = res.get("outliers") or []
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "layer"]
    out = ["| layer | " + " | ".join(f"{k} mean (max)" for k in keys) + " |",
           "|---:|" + "---:|" * len(keys)]
    for r in rows:
        out.append(f"| {r['layer']} | " + " | ".join(
            f"{r[k]['mean']:.2f} ({r[k]['max']:.1f})" for k in keys) + " |")
    return "\n".join(out)


def merge(results: list[dict]) -> list[dict]:
    """One result per (model, tokens, window): rows, greedy rows and outliers of several runs
    concatenated in order (a row already present from an earlier run is kept once)."""
    _cross_file_agreement(results)
    out: dict = {}
    for res in results:
        key = (res["model"], res["tokens"], res["window"], res["text"][0].get("offset", 0))
        if key not in out:
            out[key] = dict(res, results=list(res["results"]), greedy=list(res.get("greedy") or []))
            continue
        m = out[key]
        have = {(r["scheme"], r["path"]) for r in m["results"]}
        m["results"] += [r for r in res["results"] if (r["scheme"], r["path"]) not in have]
        m["greedy"] += res.get("greedy") or []
        m["outliers"] = m.get("outliers") or res.get("outliers")
    for m in out.values():
        base = {r["scheme"]: r["ppl"] for r in m["results"] if r["path"] != "fake"}
        for r in m["results"]:
            for ref in ("bf16", "fp32"):
                if ref in base:
                    r[f"vs_{ref}_pct"] = 100.0 * (r["ppl"] / base[ref] - 1.0)
    return list(out.values())


def _cross_file_agreement(results) -> None:
    """Greedy rows of a run without its own bf16 row are compared with the bf16 continuation of
    another run of the same model and prompts."""
    from .runner import agreement
    refs = {}
    for res in results:
        for g in res.get("greedy") or []:
            if g["scheme"] == "bf16":
                refs[(res["model"], res["window"], g["source"])] = g["tokens"]
    for res in results:
        for g in res.get("greedy") or []:
            ref = refs.get((res["model"], res["window"], g["source"]))
            if "first_divergence" not in g and ref is not None:
                g.update(agreement(ref, g["tokens"]))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    plot_path = None
    if "--plot" in argv:
        i = argv.index("--plot")
        plot_path = argv[i + 1]
        del argv[i:i + 2]
    results = merge([r for p in argv for r in load(p)])
    for res in results:
        print(f"### {res['model']}\n")
        print(ppl_table(res) + "\n")
        g = greedy_table(res)
        if g:
            print(g + "\n")
        o = outlier_table(res)
        if o:
            print(o + "\n")
    if plot_path:
        from .plot import plot
        plot(results, plot_path)


if __name__ == "__main__":
    main()
