#!/usr/bin/env bash
# Figure: what the accuracy variants cost in throughput: int4-bdr, + the calibrated K transform,
# + int8 pages for three layers, one process (docs/performance.md "What to choose";
# docs/perf/throughput-variants-h200.json). Random weights calibrate to the identity, so the
# transform runs at full cost and changes no number. Machine: one H200. About 4 minutes.
. "$(dirname "$0")/common.sh"
kernel_lib
ENG=${ENG:-/tmp/qwen3-4b-random}-whiten
qwen3_engine "$ENG" --kv-cache int4-bdr:kv,center,whiten
sawtrt bench throughput --engine "$ENG" \
  --policies "int4-bdr,int4-bdr:kv,center,whiten,int4-bdr:kv,center,whiten,int8=1+10+19" \
  --concurrency "${CONC:-16,64}" --prompt-len 8192 --output-len 1024 --kv-memory-gib 100 \
  --json "$OUT/throughput-variants-h200.json"
