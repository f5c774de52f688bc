#!/usr/bin/env bash
# One device call: validate the decode kernel, then time it (logs under $OUT).
#   bash cpp/dev/device_run.sh [bench args...]        (carry build/dec)
#   SKIP_CHECK=1 skips validation; NCU=1 profiles batch 32 x 16K int4-bdr; SASS=1 dumps SASS.
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
if [ "${SASS:-0}" = 1 ]; then
  cuobjdump -sass "$SAWTRT_KERNEL_LIB" > "$OUT/sass_all.txt" 2>&1
  gzip -f "$OUT/sass_all.txt"
fi
if [ "${NCU:-0}" = 1 ]; then
  ncu --clock-control none -k regex:DecodeKernel -s 2 -c 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats \
      python3 cpp/dev/decode_profile.py --policy int4-bdr --batch 32 --ctx 16384 \
      2>&1 | tee "$OUT/ncu.txt" | grep -E "Throughput|Duration|Registers|Occupancy|Issue|Stall|Eligible|Active Warps|Waves|L2 Hit|Mem Busy|Max Bandwidth|warning" | head -60
fi
