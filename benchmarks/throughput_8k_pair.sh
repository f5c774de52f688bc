#!/usr/bin/env bash
# Figure: int4-bdr / int4 measured in ONE process (the ratio without call-to-call host-time
# spread), 8 192-token prompts (docs/performance.md "End to end";
# docs/perf/throughput-8k-pair-h200.json). Machine: one H200. About 3 minutes.
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
sawtrt bench throughput --engine "$ENG" --policies int4,int4-bdr --concurrency "${CONC:-32,64}" \
  --prompt-len 8192 --output-len 1024 --kv-memory-gib 100 --json "$OUT/throughput-8k-pair-h200.json"
