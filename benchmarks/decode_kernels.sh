#!/usr/bin/env bash
# Figure: decode kernel vs BF16 SDPA (docs/performance.md "Decode kernel"; docs/perf/decode-kernels-h200.json).
# Machine: one H200 (any sm_90 GPU runs it). About 1 minute.
. "$(dirname "$0")/common.sh"
kernel_lib
sawtrt bench kernels --shapes qwen3-4b --reps 10 --lib "$SAWTRT_KERNEL_LIB" \
  --json "$OUT/decode-kernels-h200.json"
