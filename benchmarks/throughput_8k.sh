#!/usr/bin/env bash
# Figure: end-to-end engine throughput, Qwen3-4B, 8 192-token prompts, 1 024 outputs, one wave
# per concurrency level, the same 100 GiB KV budget for every policy, all policies in ONE
# process (docs/performance.md "End to end"; docs/perf/throughput-8k-h200.{json,png}); each
# level beside its roofline. Random weights calibrate to the identity, so the calibrated K
# transform runs at full cost and changes no number.
# Machine: one H200 (141 GB). About 10 minutes; CONC=1,64 for a shorter run. NAME names the
# JSON / PNG; POLICIES picks fewer policies (the published c = 256 level: CONC=256
# POLICIES=int4-bdr,bf16 NAME=throughput-8k-c256-h200, ~4.5 minutes).
. "$(dirname "$0")/common.sh"
kernel_lib
ENG=${ENG:-/tmp/qwen3-4b-random}-whiten
qwen3_engine "$ENG" --kv-cache int4-bdr:kv,center,whiten
sawtrt bench throughput --engine "$ENG" \
  --policies "${POLICIES:-bf16,int4,int4-bdr,int4-bdr:kv,center,whiten}" \
  --concurrency "${CONC:-1,64,256}" --prompt-len 8192 --output-len 1024 --kv-memory-gib 100 \
  --json "$OUT/${NAME:-throughput-8k-h200}.json" --plot "$OUT/${NAME:-throughput-8k-h200}.png"
