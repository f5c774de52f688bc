#!/usr/bin/env bash
# Figure: async vs synchronous scheduling, int4-bdr, both in one process: tok/s, decode step,
# and the device's idle time before each decode step (host time not hidden behind the GPU)
# (docs/performance.md "End to end"; its JSON goes to $OUT/throughput-overlap-h200.json).
# Machine: one H200. About 4 minutes (PROMPT=8192 OUTPUT=1024 CONC=64,256: about 12).
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
sawtrt bench throughput --engine "$ENG" --policies int4-bdr --scheduling async,sync \
  --concurrency "${CONC:-1,64,256}" --prompt-len "${PROMPT:-256}" --output-len "${OUTPUT:-512}" \
  --kv-memory-gib 100 --json "$OUT/throughput-overlap-h200.json"
