#!/usr/bin/env bash
# One device call: validate the decode kernel, then time it (logs under $OUT).
#   run: bash cpp/dev/device_run.sh [bench args...]   (carry build/dec)
set -o pipefail
export PYTHONUNBUFFERED=1
export SAWTRT_KERNEL_LIB=$PWD/build/dec/libsawtrt_kernels.so
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  python3 cpp/dev/decode_check.py --lib "$SAWTRT_KERNEL_LIB" 2>&1 | tee "$OUT/check.log"
fi
if [ "$#" -gt 0 ]; then
  python3 -c "from sawtrt.cli import main; main()" bench kernels "$@" 2>&1 | tee "$OUT/bench.log"
fi
