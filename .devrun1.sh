#!/bin/bash
# device call 1: engine, quick GPU tests of the compiled path, decode-step A/B, step profile
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 SAWTRT_KERNEL_LIB=$PWD/build/dev/libsawtrt_kernels.so
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
sawtrt() { python3 -c 'from sawtrt.cli import main; main()' "$@"; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
sawtrt build --model qwen3-4b --random-weights --no-kernels --max-batch 256 --max-seq-len 9344 \
  --kv-cache int4-bdr:kv,center,whiten --output /tmp/eng > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
echo "build done $(( $(date +%s) - t0 )) s"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime_gpu.py -x \
  -k "compiled or cuda_graph_decode" > $OUT/tests1.log 2>&1; tail -3 $OUT/tests1.log
echo "tests done $(( $(date +%s) - t0 )) s"
timeout 200 python3 -m sawtrt.bench.decode_step --engine /tmp/eng --batch 1,64 --context 8192 --steps 10 \
  --compile off,on --kv-policy 'int4-bdr;int4-bdr:kv,center,whiten' --json $OUT/decode_step.json > $OUT/decode_step.log 2>&1
tail -12 $OUT/decode_step.log
echo "decode_step done $(( $(date +%s) - t0 )) s"
SAWTRT_COMPILE=1 timeout 90 python3 -m sawtrt.bench.step_profile --engine /tmp/eng --policies int4-bdr \
  --points 1x8192,64x8192 --kv-memory-gib 40 --json $OUT/profile.json > $OUT/profile.log 2>&1
cat $OUT/profile.log | grep -v Warning | tail -24
echo "all done $(( $(date +%s) - t0 )) s"
