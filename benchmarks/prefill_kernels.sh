#!/usr/bin/env bash
# Figure: prefill kernel vs causal BF16 SDPA (docs/performance.md "Prefill kernel";
# docs/perf/prefill-kernels-h200.json). Machine: one H200. Under a minute.
. "$(dirname "$0")/common.sh"
kernel_lib
python3 -m sawtrt.bench.prefill --lib "$SAWTRT_KERNEL_LIB" --shape qwen3-4b \
  --json "$OUT/prefill-kernels-h200.json"
