#!/usr/bin/env bash
# Figure: the one-row skinny GEMM (saw_linear) against cuBLAS on Qwen3-4B's decode-step GEMMs,
# and the decode step at one sequence with each (docs/performance.md "Decode step";
# docs/perf/linear-h200.json, docs/perf/decode-step-linear-h200.json). The step A/B runs two
# processes per side (SAWTRT_LINEAR_MAX_ROWS=0: cuBLAS everywhere) and keeps the second of each,
# merged into one JSON.
# Machine: one H200. About 3 minutes.
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
python3 -m sawtrt.bench.linear --json "$OUT/linear-h200.json"
for rows in 0 1 0 1; do
  SAWTRT_LINEAR_MAX_ROWS=$rows python3 -m sawtrt.bench.decode_step --engine "$ENG" --batch 1 \
    --context 8192 --steps 30 --kv-policy int4-bdr --kv-memory-gib 20 \
    --json "$OUT/decode-step-linear-rows$rows.json"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = {name: json.load(open(f"{out}/decode-step-linear-rows{rows}.json"))
        for name, rows in (("cublas", 0), ("saw_linear", 1))}
json.dump({"note": "decode step at B = 1, 8 192 context, int4-bdr; second of two processes per side",
           **runs}, open(f"{out}/decode-step-linear-h200.json", "w"), indent=1)
PY
