#!/usr/bin/env bash
# Figure: where one decode step at one sequence goes (docs/performance.md "Decode step"):
# torch.profiler over 5 graph-replayed steps of Qwen3-4B int4-bdr at 8 192 tokens of context,
# kernels grouped by class, the 24 costliest ($OUT/decode-step-profile-h200.json).
# Machine: one H200. About 1 minute.
. "$(dirname "$0")/common.sh"
qwen3_on_gpu
python3 -m sawtrt.bench.step_profile --engine "$ENG" --policies int4-bdr --points 1x8192 \
  --steps 5 --kv-memory-gib 20 --json "$OUT/decode-step-profile-h200.json"
