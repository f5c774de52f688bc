#!/usr/bin/env bash
# decode v2, device call 2 (2026-11-29): validate + time v0 (before), v2 (call 1's best), v4
# (+ lean copy issue), v5 (v4 at 3 CTAs/SM, 7 stages); smaller splits for small shapes; ncu on
# the best.   carry: build/v0 build/v2 build/v4 build/v5
# Variants: see cpp/dev/decode_v2_knobs.cuh (v0 = the previous kernel, built before the change).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader > "$OUT/gpu.txt"
VARS=${VARS:-v0 v2 v4 v5}
L=$(for v in $VARS; do printf "%s=build/%s/libsawdecode_dev.so," $v $v; done); L=${L%,}
python3 cpp/dev/decode_multi.py --libs "$L" --json "$OUT/multi2.json" --best /tmp/best \
  --shapes 32x16384,128x16384,8x32768,1x1024,32x1024,1x16384,8x16384,32x4096,32x32768,128x32768 \
  2>&1 | tee "$OUT/multi2.log"
B=$(cat /tmp/best 2>/dev/null || echo v2)
SAWTRT_DECODE_MIN_CHUNK=128 python3 cpp/dev/decode_multi.py --no-check --shapes 1x1024,8x1024,1x4096 \
  --libs "$B=build/$B/libsawdecode_dev.so" 2>&1 | sed 's/^/chunk128 /' | tee -a "$OUT/multi2.log"
ncu --clock-control none -k regex:DecodeKernel -s 2 -c 1 --section SpeedOfLight \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  python3 cpp/dev/decode_profile.py --launches 3 --lib "build/$B/libsawdecode_dev.so" > "$OUT/ncu2.txt" 2>&1
K='_ZN3saw12DecodeKernelINS_12DecodeTraitsILi128ELb1ELi1EEE13__nv_bfloat16EEvNS_12DecodeParamsE'
cuobjdump -sass -fun "$K" build/$B/libsawdecode_dev.so 2>&1 | gzip > "$OUT/sass2.txt.gz"
grep -E "^check|^B=|chunk128 B=|^best" "$OUT/multi2.log"
grep -E "DecodeKernel|Duration|DRAM Throughput|Issued Warp|Eligible Warps|Achieved Occ|Registers Per|stalled_(wait|math|short|long|not_sel|dispatch)|highest-util" "$OUT/ncu2.txt"
