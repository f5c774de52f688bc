#!/usr/bin/env bash
# Figure: prefill step over fresh K/V (page write + prefix gather + cuDNN / flash attention) vs
# the quantized-read INT4 prefill kernel and dense BF16 attention, bf16 / int4 / int4-bdr pages
# (docs/performance.md "Prefill"; docs/perf/prefill-fresh-h200.json). Machine: one H200.
# About a minute.
. "$(dirname "$0")/common.sh"
kernel_lib
python3 -m sawtrt.bench.prefill --lib "$SAWTRT_KERNEL_LIB" --shape qwen3-4b \
  --backends auto,serial-write --reps 5 --json "$OUT/prefill-fresh-h200.json"
