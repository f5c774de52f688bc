#!/usr/bin/env bash
# Figure: the fused rotate + quantize + paged-store kernel (docs/performance.md "Write kernel";
# docs/perf/write-kernel-h200.json). Machine: one H200. Seconds.
. "$(dirname "$0")/common.sh"
kernel_lib
python3 -m sawtrt.kernels.bench --json "$OUT/write-kernel-h200.json"
