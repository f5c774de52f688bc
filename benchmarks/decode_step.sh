#!/usr/bin/env bash
# Figure: one decode step of Qwen3-4B (random weights) at 8 192 tokens of context, int4-bdr,
# B = 1 and 64, against the step's byte floor (weights + KV at the copy bandwidth measured in
# the run) (docs/performance.md "Decode step"). COMPILE=off,auto adds the eager rows;
# SAWTRT_QK_PROLOGUE=0 keeps q/k-norm and RoPE in the compiled layer work (the A/B of the
# write kernel's prologue). Machine: one H200. About 1 minute (the first compile takes ~30 s).
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
python3 -m sawtrt.bench.decode_step --engine "$ENG" --batch 1,64 --context 8192 --steps 10 \
  --compile "${COMPILE:-auto}" --kv-policy int4-bdr --kv-memory-gib 40 \
  --json "$OUT/decode-step-h200.json"
