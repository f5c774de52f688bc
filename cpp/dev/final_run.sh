#!/usr/bin/env bash
# The last device call of the 2026-11-29 session: validate, then the benchmark table for
# docs/performance.md (qwen3-4b full matrix; D=64 and D=256 at 1K/16K), then ncu on B=32 x 16K.
set -o pipefail
export PYTHONUNBUFFERED=1
export SAWTRT_KERNEL_LIB=$PWD/build/dec/libsawtrt_kernels.so
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 cpp/dev/decode_check.py --lib "$SAWTRT_KERNEL_LIB" 2>&1 | tee "$OUT/check.log"
S="python3 -c 'from sawtrt.cli import main; main()' bench kernels"
eval $S --shapes qwen3-4b --reps 10 --json "$OUT/kernels-h200.json" 2>&1 | tee "$OUT/bench.log"
eval $S --shapes d64,d256 --contexts 1024,16384 --reps 10 --json "$OUT/kernels-h200-d64-d256.json" 2>&1
NCU=1 SKIP_CHECK=1 bash cpp/dev/device_run.sh > /dev/null 2>&1
grep -E "Duration|DRAM Throughput|Issued Warp|Eligible Warps|Registers Per|Achieved Occ" "$OUT/ncu.txt"
# variant B (sandbox lib: -DSAW_DECODE_MIN_BLOCKS=5 -DSAW_DECODE_INFLIGHT_BYTES=9000, 5 CTAs/SM)
if [ -f build/decB/libsawdecode_dev.so ]; then
  python3 cpp/dev/decode_check.py --lib build/decB/libsawdecode_dev.so 2>&1 | tail -3 | tee "$OUT/benchB.log"
  eval $S --lib build/decB/libsawdecode_dev.so --shapes qwen3-4b --batches 1,32,128 --contexts 1024,16384,32768 --reps 10 2>&1 | tee -a "$OUT/benchB.log"
fi
