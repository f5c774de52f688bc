# Sourced by the figure scripts in this folder (bash). Run them from anywhere; they cd to the
# repository root. Results go to $OUT (default /tmp/sawtrt-bench).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sawtrt-bench}
mkdir -p "$OUT"
sawtrt() { python3 -m sawtrt "$@"; }

kernel_lib() {       # the sm_90a kernel library (H100/H200), built once, cached by source hash
  python3 build_scripts/build.py --dev --out build/dev > "$OUT/build-kernels.log"
  export SAWTRT_KERNEL_LIB=$PWD/build/dev/libsawtrt_kernels.so
}

qwen3_on_gpu() {     # the kernel library and the shared engine $ENG (default /tmp/qwen3-4b-random)
  kernel_lib
  ENG=${ENG:-/tmp/qwen3-4b-random}
  qwen3_engine "$ENG"
}

qwen3_engine() {     # DIR [build options]: the random-weight Qwen3-4B engine of the throughput
  local dir=$1; shift  # figures (bf16 weights; 256 sequences of 8 192 + 1 024 + 128 tokens)
  [ -f "$dir/config.json" ] && return 0
  sawtrt build --model qwen3-4b --random-weights --no-kernels --max-batch 256 \
    --max-seq-len 9344 "$@" --output "$dir" > "$OUT/build-$(basename "$dir").log"
}

realisations() {     # POLICY N: an eval policy list of N sign realisations: the policy
  # without signs, then with sign seeds 1 .. N-1
  local p=$1 n=$2 s out=$1
  for ((s = 1; s < n; s++)); do out+=",$p,seed=$s"; done
  echo "$out"
}
