#!/usr/bin/env bash
# Build a sandbox decode library (sm_90a) with compile-time knobs:
#   bash cpp/dev/build_variant.sh build/v1 -DSAW_DECODE_PAGE_PREFETCH=1 ...
# -> build/v1/libsawdecode_dev.so (+ ptxas.log with registers/spills per kernel)
set -euo pipefail
out=$1; shift
mkdir -p "$out"
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
  -shared -Xcompiler -fPIC -Icpp/include "$@" cpp/kernels/decode.cu cpp/dev/decode_dev.cu \
  -o "$out/libsawdecode_dev.so" 2> "$out/ptxas.log"
grep -A1 "DecodeKernel" "$out/ptxas.log" | grep -E "registers|spill" | head -0 || true
