#!/usr/bin/env bash
# Figure: the 8 192-token workload through a real tritonserver, gRPC streaming
# (docs/performance.md "Serving"; docs/perf/triton-8k-h200-{bf16,int4,int4-bdr}.json).
# Machine: one H200 with the `serving` extra installed (tritonserver from the nvidia-pytriton
# wheel; on a machine without a package registry: make_triton_bundle.sh, then
# `source .carry/triton/env.sh`). About 6 minutes.
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
python3 benchmarks/triton_selfcheck.py --need torch --log "$OUT/triton-selfcheck.log"
for policy in int4-bdr int4 bf16; do
  sawtrt bench serve --engine "$ENG" --kv-cache "$policy" --kv-memory-gib 100 --max-num-seqs 16 \
    --max-num-batched-tokens 8192 --concurrency "${CONC:-1,16}" --requests-per-user 1 \
    --prompt-len 8192 --output-len 1024 --timeout 500 --server-log "$OUT/triton-$policy.log" \
    --json "$OUT/triton-8k-h200-$policy.json"
done
