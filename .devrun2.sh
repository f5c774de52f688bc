#!/bin/bash
# device call 2: GPU tests after the last edit, decode-step numbers, a short throughput run
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 SAWTRT_KERNEL_LIB=$PWD/build/dev/libsawtrt_kernels.so
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
sawtrt() { python3 -c 'from sawtrt.cli import main; main()' "$@"; }
t0=$(date +%s)
[ -f /tmp/eng/config.json ] || sawtrt build --model qwen3-4b --random-weights --no-kernels --max-batch 256 \
  --max-seq-len 9344 --kv-cache int4-bdr:kv,center,whiten --output /tmp/eng > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
echo "build done $(( $(date +%s) - t0 )) s"
timeout 100 python3 -m sawtrt.bench.decode_step --engine /tmp/eng --batch 1,64 --context 8192 --steps 10 \
  --compile on --kv-policy 'int4-bdr;int4-bdr:kv,center,whiten' --json $OUT/decode_step.json > $OUT/decode_step.log 2>&1
tail -6 $OUT/decode_step.log
echo "decode_step done $(( $(date +%s) - t0 )) s"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_runtime_gpu.py \
  tests/test_trt_enqueue.py > $OUT/tests.log 2>&1; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -8
echo "tests done $(( $(date +%s) - t0 )) s"
timeout 90 python3 -c 'from sawtrt.cli import main; main()' bench throughput --engine /tmp/eng --policies int4-bdr \
  --concurrency 1,16 --prompt-len 8192 --output-len 128 --kv-memory-gib 40 --json $OUT/throughput.json \
  --plot $OUT/throughput.png > $OUT/throughput.log 2>&1
grep -v "Warning\|warn" $OUT/throughput.log | tail -5
echo "all done $(( $(date +%s) - t0 )) s"
