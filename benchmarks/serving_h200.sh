#!/usr/bin/env bash
# Issue 8 on one H200: engine-only serving throughput of qwen3-4b (random weights) for
# bf16 / int4 / int4-bdr KV caches, plus a per-kernel profile of one decode step.
#
#   bash benchmarks/serving_h200.sh STAGE...     (device tool: carry build/final, logs in $OUT)
#
# Stages: gpu-tests (the GPU pytest files; run first after any runtime or kernel change) |
#         profile | long-POLICY (8 192-token prompts, 1 024 outputs, concurrency 1..256) |
#         short (256-token prompts, 1 024 outputs, all three policies) | smoke |
#         pair (int4 then int4-bdr in ONE process at $PAIR_CONC: the bdr / int4 ratio without
#               the call-to-call spread of host time) | prefill (python -m sawtrt.bench.prefill) |
#         mixed (int4-bdr, + the served K transform, + int8 pages for 3 layers; $MIXED_CONC) |
#         triton-POLICY (the same long requests through a real tritonserver and gRPC streaming:
#                        `sawtrt bench serve --engine`, concurrency $TRITON_CONC, one wave each;
#                        needs the bundle: carry .carry/triton, see benchmarks/make_triton_bundle.sh)
# The kernel library is built here beforehand: python build_scripts/build.py --dev --out build/final
# e.g. device run, carry [".carry/triton", "build/final"]: bash benchmarks/serving_h200.sh triton-int4-bdr
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SAWTRT_KERNEL_LIB=$PWD/build/final/libsawtrt_kernels.so
OUT=${OUT:-/tmp/sawtrt-serving}; mkdir -p "$OUT"
sawtrt() { python3 -c 'from sawtrt.cli import main; main()' "$@"; }
ENG=${ENG:-/tmp/qwen3-4b-random}
KV_GIB=${KV_GIB:-100}           # one KV budget for every policy (~77 % of the free memory)
CONC=${CONC:-1,8,16,32,64,128,256}
TRITON_CONC=${TRITON_CONC:-1,16,64}   # short: a device call has 10 minutes, server start included
TRITON_RPU=${TRITON_RPU:-1}           # requests per user and level
TRITON_BUNDLE=${TRITON_BUNDLE:-.carry/triton}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee -a "$OUT/gpu.txt"
qwen3_engine() {     # DIR NAME [build options]: the random-weight qwen3-4b engine, built once
  local dir=$1 name=$2; shift 2
  [ -f "$dir/config.json" ] && return 0
  sawtrt build --model qwen3-4b --random-weights --no-kernels --max-batch 256 \
    --max-seq-len 9344 "$@" --output "$dir" > "$OUT/$name.log" 2>&1 \
    || { tail "$OUT/$name.log"; exit 1; }
}
qwen3_engine "$ENG" build
triton_stage() {     # POLICY: selfcheck (10 s), then sawtrt bench serve through tritonserver
  local pol=$1 rc
  [ -f "$TRITON_BUNDLE/env.sh" ] || { echo "no $TRITON_BUNDLE (bash benchmarks/make_triton_bundle.sh)"; return 1; }
  . "$TRITON_BUNDLE/env.sh" || return 1
  python3 benchmarks/triton_selfcheck.py --need torch --need sawtrt.engine.llm_engine \
    --log "$OUT/triton-selfcheck.server.log" > "$OUT/triton-selfcheck.log" 2>&1 \
    || { tail -n 40 "$OUT/triton-selfcheck.log"; return 1; }
  sawtrt bench serve --engine "$ENG" --kv-cache "$pol" --kv-memory-gib "$KV_GIB" \
    --max-num-seqs "$(tr , '\n' <<< "$TRITON_CONC" | sort -n | tail -1)" \
    --max-num-batched-tokens 8192 --concurrency "$TRITON_CONC" \
    --requests-per-user "$TRITON_RPU" --prompt-len 8192 --output-len 1024 --timeout 500 \
    --server-log "$OUT/triton-$pol.server.log" --json "$OUT/triton-$pol.json" \
    > "$OUT/triton-$pol.log" 2>&1
  rc=$?; tail -n 15 "$OUT/triton-$pol.log"; return $rc
}
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    gpu-tests)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py \
        tests/test_trt_enqueue.py tests/test_runtime_gpu.py > "$OUT/pytest.log" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -20 ;;
    profile)
      python3 -m sawtrt.bench.step_profile --engine "$ENG" --policies bf16,int4,int4-bdr \
        --points 1x8192,64x8192 --kv-memory-gib "$KV_GIB" --json "$OUT/profile.json" ;;
    long-*)
      sawtrt bench throughput --engine "$ENG" --policies "${stage#long-}" --concurrency "$CONC" \
        --prompt-len 8192 --output-len 1024 --kv-memory-gib "$KV_GIB" \
        --json "$OUT/long-${stage#long-}.json" ;;
    short)
      sawtrt bench throughput --engine "$ENG" --policies bf16,int4,int4-bdr \
        --concurrency "$CONC" --prompt-len 256 --output-len 1024 --kv-memory-gib "$KV_GIB" \
        --json "$OUT/short.json" ;;
    pair)
      sawtrt bench throughput --engine "$ENG" --policies int4,int4-bdr \
        --concurrency "${PAIR_CONC:-16,32,64}" --prompt-len 8192 --output-len 1024 \
        --kv-memory-gib "$KV_GIB" --json "$OUT/pair.json" ;;
    mixed)   # what the accuracy variant costs: the K transform (random weights calibrate to
             # the identity, so it runs at full cost) and int8 pages for 3 of the 36 layers;
             # an engine built with the transform policy holds the (identity) calibration
      qwen3_engine "$ENG-whiten" build-whiten --kv-cache int4-bdr:kv,center,whiten
      sawtrt bench throughput --engine "$ENG-whiten" \
        --policies "int4-bdr,int4-bdr:kv,center,whiten,int4-bdr:kv,center,whiten,int8=1+10+19" \
        --concurrency "${MIXED_CONC:-16,64}" --prompt-len 8192 --output-len 1024 \
        --kv-memory-gib "$KV_GIB" --json "$OUT/mixed.json" ;;
    prefill)
      python3 -m sawtrt.bench.prefill --json "$OUT/prefill.json" ;;
    smoke)
      sawtrt bench throughput --engine "$ENG" --policies int4-bdr,bf16 --concurrency 1,64 \
        --prompt-len 8192 --output-len 64 --kv-memory-gib "$KV_GIB" --json "$OUT/smoke.json" ;;
    triton-*)
      triton_stage "${stage#triton-}" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac || echo "stage $stage failed rc=$?"
done
echo "== done $(date -u +%T)"
