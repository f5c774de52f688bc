#!/usr/bin/env bash
# Figure: end-to-end engine throughput, Qwen3-4B, 8 192-token prompts, 1 024 outputs, one wave
# per concurrency level, the same 100 GiB KV budget for every policy (docs/performance.md
# "End to end"; docs/perf/throughput-8k-h200.{json,png}).
# Machine: one H200 (141 GB). About 20 minutes in all; CONC=1,8,16,32,64 for a shorter run.
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
for policy in bf16 int4 int4-bdr; do
  sawtrt bench throughput --engine "$ENG" --policies "$policy" \
    --concurrency "${CONC:-1,8,16,32,64,128,256}" --prompt-len 8192 --output-len 1024 \
    --kv-memory-gib 100 --json "$OUT/throughput-8k-$policy.json"
done
sawtrt bench plot-throughput "$OUT"/throughput-8k-{bf16,int4,int4-bdr}.json \
  --json "$OUT/throughput-8k-h200.json" --plot "$OUT/throughput-8k-h200.png"
