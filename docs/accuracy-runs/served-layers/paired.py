"""The served per-layer policy (`sawtrt eval`, runtime path, served_a/b.json) against the
baseline's per-seed values (../rt_*.json) and the experiment script's (../layers/)."""
import json, os, re, statistics as st

here = os.path.dirname(os.path.abspath(__file__))


def by_seed(files, keep):
    out = {}
    for f in files:
        for r in json.load(open(os.path.join(here, f)))["results"]:
            if keep(r["scheme"]):
                m = re.search(r"seed=(\d+)", r["scheme"])
                out[int(m.group(1)) if m else 0] = r["ppl"]
    return out


bf16 = by_seed(["bf16.json"], lambda s: s == "bf16")[0]
served = by_seed(["served_a.json", "served_b.json"], lambda s: s.endswith("int8=1+10+19"))
base = by_seed(["../rt_A.json", "../rt_C.json", "../rt_E.json", "../rt_F.json"],
               lambda s: s.startswith("int4-bdr:h=64,kv,") and s.endswith("center,whiten"))
script = {r["seed"]: r["ppl"] for r in map(json.loads, open(
    os.path.join(here, "..", "layers", "ppl_int8_10+19+1.jsonl")))}
seeds = sorted(served)
rel = [100 * (served[s] / bf16 - 1) for s in seeds]
diff = [100 * (served[s] - base[s]) / bf16 for s in seeds]
n = len(seeds)
print(f"bf16 {bf16:.6f}; {n} realisations (seeds {seeds[0]}..{seeds[-1]})")
print(f"served int4-bdr:h=64,kv,center,whiten,int8=1+10+19: {st.mean(rel):+.2f} % "
      f"± {st.stdev(rel):.2f} (sd), s.e. {st.stdev(rel) / n ** 0.5:.2f}; "
      f"{sum(r < 2 for r in rel)}/{n} below 2 %; range {min(rel):+.2f} .. {max(rel):+.2f} %")
print(f"paired vs int4-bdr:h=64,kv,center,whiten: {st.mean(diff):+.2f} "
      f"± {st.stdev(diff) / n ** 0.5:.2f} points (s.e.)")
print("identical to the experiment script per seed:",
      all(abs(served[s] - script[s]) < 1e-6 for s in seeds))
