#!/usr/bin/env bash
# One device call after a decode change: validate everything that touches the kernels, then
# re-time the decode table. Logs under $OUT. Carry build/final (python build_scripts/build.py
# --dev --out build/final).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SAWTRT_KERNEL_LIB=$PWD/build/final/libsawtrt_kernels.so
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 90 python3 cpp/dev/decode_check.py --lib "$SAWTRT_KERNEL_LIB" > "$OUT/check.log" 2>&1
echo "decode_check rc=$?"; tail -3 "$OUT/check.log"
timeout 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_kernels_gpu.py \
  tests/test_trt_enqueue.py tests/test_runtime_gpu.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -30
grep "ERR decode" "$OUT/pytest.log" | sort -t' ' -k8 -g | tail -4
timeout 150 python3 -c 'from sawtrt.cli import main; main()' bench kernels --shapes qwen3-4b \
  --reps 10 --json "$OUT/kernels-h200.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -22 "$OUT/bench.log"
