#!/usr/bin/env bash
# Figure: 1 000 streamed requests at concurrency 64 through tritonserver, none lost
# (docs/performance.md "Serving"; docs/perf/serving-soak-cpu.json). Machine: any Linux CPU
# machine with the `serving` extra; about 15 minutes on 2 cores.
. "$(dirname "$0")/common.sh"
ENG=${ENG:-/tmp/sawtrt-soak}
[ -f "$ENG/config.json" ] || sawtrt build --model smollm2-135m --kv-cache int4-bdr --no-kernels \
  --max-batch 64 --max-seq-len 128 --output "$ENG"
sawtrt bench serve --engine "$ENG" --device cpu --concurrency 64 --num-requests 1000 \
  --prompt-len 16 --output-len 8 --timeout 3600 --json "$OUT/serving-soak-cpu.json"
