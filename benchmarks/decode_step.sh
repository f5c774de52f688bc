#!/usr/bin/env bash
# Figure: one decode step of Qwen3-4B (random weights) at 8 192 tokens of context with the
# compiled layer work, int4-bdr and int4-bdr:kv,center,whiten in one process, against the
# step's byte floor (weights + KV at the copy bandwidth measured in the run)
# (docs/performance.md "Decode step"). COMPILE=off,on adds the eager rows. Uses the whiten
# engine of throughput_variants.sh. Machine: one H200. About 3 minutes (the first compile
# takes ~30 s).
. "$(dirname "$0")/common.sh"
kernel_lib
ENG=${ENG:-/tmp/qwen3-4b-random}-whiten
qwen3_engine "$ENG" --kv-cache int4-bdr:kv,center,whiten
python3 -m sawtrt.bench.decode_step --engine "$ENG" --batch 1,64,256 --context 8192 \
  --steps 10 --compile "${COMPILE:-on}" --kv-policy 'int4-bdr;int4-bdr:kv,center,whiten' \
  --kv-memory-gib 100 --json "$OUT/decode-step-h200.json"
