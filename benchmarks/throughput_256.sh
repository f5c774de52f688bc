#!/usr/bin/env bash
# Figure: short prompts (256 in / 1 024 out), the three policies in one process
# (docs/performance.md "End to end"; docs/perf/throughput-256-h200.{json,png}).
# Machine: one H200. About 6 minutes.
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
sawtrt bench throughput --engine "$ENG" --policies bf16,int4,int4-bdr \
  --concurrency "${CONC:-1,8,16,32,64,128,256}" --prompt-len 256 --output-len 1024 \
  --kv-memory-gib 100 --json "$OUT/throughput-256-h200.json" --plot "$OUT/throughput-256-h200.png"
