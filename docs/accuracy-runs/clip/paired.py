import re, sys, statistics as st, glob
base = [19.152036, 19.202332, 19.053204, 19.227, 19.332, 19.340, 19.295, 19.247, 19.349, 19.198, 19.064, 19.452, 19.349, 19.239, 19.328, 19.270]
BF = 18.847
def seed(s):
    m = re.search(r"seed=(\d+)", s); return int(m.group(1)) if m else 0
rows = {}
for f in sys.argv[1:]:
    for line in open(f):
        if " ppl " in line and "runtime   ppl" in line:
            p = line.split(); name = p[0]; ppl = float(p[p.index("ppl") + 1])
            key = re.sub(r"seed=\d+,", "", name)
            rows.setdefault(key, {})[seed(name)] = ppl
for k, d in rows.items():
    seeds = sorted(d); v = [d[s] for s in seeds]; b = [base[s] for s in seeds]
    rel = [100 * (x / BF - 1) for x in v]; diff = [100 * (x - y) / BF for x, y in zip(v, b)]
    n = len(v); sd = st.stdev(rel) if n > 1 else float("nan"); sdd = st.stdev(diff) if n > 1 else float("nan")
    print(f"{k:<45} n={n:2d} mean {st.mean(v):.3f}  vs bf16 {st.mean(rel):+.2f} % ± {sd:.2f} (sd)  "
          f"paired diff vs base {st.mean(diff):+.2f} pts ± {sdd / n**0.5:.2f} (s.e.)  [base same seeds {100*(st.mean(b)/BF-1):+.2f} %]")
