#!/usr/bin/env bash
# decode v2, device call 1 (2026-11-29): validate + time sandbox variants build/v0..v3 in one
# process, small shapes with a single split, ncu stall reasons on v0 and the best variant.
#   carry: build/v0 build/v1 build/v2 build/v3
# Variants: see cpp/dev/decode_v2_knobs.cuh (v0 = the previous kernel, built before the change).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader > "$OUT/gpu.txt"
VARS=${VARS:-v0 v1 v2 v3}
L=$(for v in $VARS; do printf "%s=build/%s/libsawdecode_dev.so," $v $v; done); L=${L%,}
python3 cpp/dev/decode_multi.py --libs "$L" --json "$OUT/multi.json" --best /tmp/best 2>&1 | tee "$OUT/multi.log"
B=$(cat /tmp/best 2>/dev/null || echo v0)
SAWTRT_DECODE_MIN_CHUNK=1024 python3 cpp/dev/decode_multi.py --no-check --shapes 1x1024,8x1024 \
  --libs "v0=build/v0/libsawdecode_dev.so,$B=build/$B/libsawdecode_dev.so" 2>&1 \
  | sed 's/^/one-split /' | tee -a "$OUT/multi.log"
ncu --clock-control none -k regex:DecodeKernel -s 2 -c 2 --section SpeedOfLight \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section SourceCounters --section Occupancy \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  -f -o /tmp/prof python3 cpp/dev/decode_profile.py --launches 3 \
  --lib "build/v0/libsawdecode_dev.so,build/$B/libsawdecode_dev.so" > "$OUT/ncu_run.log" 2>&1
ncu -i /tmp/prof.ncu-rep --page details > "$OUT/ncu.txt" 2>&1
ncu -i /tmp/prof.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > "$OUT/src.csv.gz"
K='_ZN3saw12DecodeKernelINS_12DecodeTraitsILi128ELb1ELi1EEE13__nv_bfloat16EEvNS_12DecodeParamsE'
for v in v0 $B; do echo "== $v"; cuobjdump -sass -fun "$K" build/$v/libsawdecode_dev.so; done 2>&1 | gzip > "$OUT/sass.txt.gz"
grep -E "^check|B= *32 ctx= *16384|one-split B" "$OUT/multi.log"
grep -E "DecodeKernel|Duration|DRAM Throughput|Issued Warp|Eligible Warps|Registers Per|Achieved Occ|issue_stalled" "$OUT/ncu.txt" | sort | uniq -c | sort -rn | head -0
grep -E "DecodeKernel|Duration|DRAM Throughput|Issued Warp|Eligible Warps|Achieved Occ" "$OUT/ncu.txt"
