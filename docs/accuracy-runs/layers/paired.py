"""Table of the per-layer runs (ppl_*.jsonl) paired with the baseline's per-seed values."""
import glob, json, re, statistics as st, os
here = os.path.dirname(os.path.abspath(__file__))
BF = 18.847
base = {}
for f in ("rt_A.json", "rt_C.json", "rt_E.json", "rt_F.json"):
    for r in json.load(open(os.path.join(here, "..", f)))["results"]:
        if r["scheme"].startswith("int4-bdr:h=64,kv,") and r["scheme"].endswith("center,whiten"):
            m = re.search(r"seed=(\d+)", r["scheme"])
            base[int(m.group(1)) if m else 0] = r["ppl"]
BYTES = {"bf16": 768 - 216, "int8": 408 - 216}
def line(name, d, extra=0, paired=True):
    seeds = sorted(d); v = [d[s] for s in seeds]; b = [base[s] for s in seeds]
    rel = [100 * (x / BF - 1) for x in v]; diff = [100 * (x - y) / BF for x, y in zip(v, b)]
    n = len(v)
    print(f"| {name} | {n} | {st.mean(v):.3f} | {st.mean(rel):+.2f} % ± {st.stdev(rel):.2f} | "
          f"{sum(r < 2 for r in rel)}/{n} | "
          + f"{100 * (st.mean(b) / BF - 1):+.2f} % | "
          + (f"**{st.mean(diff):+.2f} ± {st.stdev(diff) / n ** 0.5:.2f}** | " if paired else "— | ")
          + f"{6480 + extra} (+{100 * extra / 6480:.1f} %) |")
print("| layers kept wide | realisations | mean ppl | vs bf16 (mean ± sd) | below 2 % | baseline, same seeds | paired diff vs base (pts, mean ± s.e.) | KV bytes/token |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
line("none (baseline `int4-bdr:h=64,kv,center,whiten`)", base, 0, False)
def key(f):
    r = json.loads(open(f).readline())
    return (r["layers"][0] != 10, r["override"] != "bf16", len(r["layers"]))
for f in sorted(glob.glob(os.path.join(here, "ppl_*.jsonl")), key=key):
    rows = [json.loads(x) for x in open(f)]
    d = {r["seed"]: r["ppl"] for r in rows}
    fmt, layers = rows[0]["override"], rows[0]["layers"]
    line(f"{'+'.join(map(str, layers))} in {fmt}", d, BYTES[fmt] * len(layers))
