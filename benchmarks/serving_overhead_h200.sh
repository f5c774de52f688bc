#!/usr/bin/env bash
# What serving through tritonserver costs on one H200: the same requests (qwen3-4b random weights,
# int4-bdr, PROMPT_LEN-token prompts, OUTPUT_LEN outputs, EOS ignored, one wave per level) run
#   engine-only   `sawtrt bench throughput --engine` (the LLMEngine in this process), and
#   server        `sawtrt bench serve --engine` (tritonserver 2.51, Python backend, one gRPC
#                 stream per request, a response per engine step),
# at each concurrency of CONC, and prints server / engine-only output tok/s per level.
# Goal: loss <= 5 % at c = 64, <= 10 % at c = 16.
#
#   here:  python build_scripts/build.py --dev --out build/dev
#          bash benchmarks/make_triton_bundle.sh            # .carry/triton (~40 MB)
#          (copy both with the tree to the GPU machine)
#   there: bash benchmarks/serving_overhead_h200.sh         # logs + JSON in $OUT
#
# Knobs (env): CONC (1,16,64), PROMPT_LEN (8192), OUTPUT_LEN (1024), POLICY (int4-bdr),
# KV_GIB (100), ENG (/tmp/qwen3-4b-random: built once per machine), TRITON_BUNDLE (.carry/triton),
# SAWTRT_KERNEL_LIB (build/dev/libsawtrt_kernels.so).
# Time: 8K/1K at 1,16,64 is ~3 min per side plus the engine build and the server start.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export SAWTRT_KERNEL_LIB=${SAWTRT_KERNEL_LIB:-$PWD/build/dev/libsawtrt_kernels.so}
OUT=${OUT:-/tmp/sawtrt-serving-overhead}; mkdir -p "$OUT"
CONC=${CONC:-1,16,64}
PROMPT_LEN=${PROMPT_LEN:-8192}
OUTPUT_LEN=${OUTPUT_LEN:-1024}
POLICY=${POLICY:-int4-bdr}
KV_GIB=${KV_GIB:-100}
ENG=${ENG:-/tmp/qwen3-4b-random}
TRITON_BUNDLE=${TRITON_BUNDLE:-.carry/triton}
MAXC=$(tr , '\n' <<< "$CONC" | sort -n | tail -1)
sawtrt() { python3 -c 'from sawtrt.cli import main; main()' "$@"; }
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== build $(date -u +%T)"
if [ ! -f "$ENG/config.json" ]; then
  sawtrt build --model qwen3-4b --random-weights --no-kernels --max-batch 256 \
    --max-seq-len $((PROMPT_LEN + OUTPUT_LEN + 128)) --output "$ENG" > "$OUT/build.log" 2>&1 \
    || { tail "$OUT/build.log"; exit 1; }
fi

echo "== engine-only $(date -u +%T)"
sawtrt bench throughput --engine "$ENG" --policies "$POLICY" --concurrency "$CONC" \
  --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --kv-memory-gib "$KV_GIB" \
  --max-num-batched-tokens 8192 --json "$OUT/engine.json" > "$OUT/engine.log" 2>&1 || { tail -n 30 "$OUT/engine.log"; exit 1; }
tail -n 8 "$OUT/engine.log"

echo "== server $(date -u +%T)"
[ -f "$TRITON_BUNDLE/env.sh" ] || { echo "no $TRITON_BUNDLE (bash benchmarks/make_triton_bundle.sh)"; exit 1; }
. "$TRITON_BUNDLE/env.sh" || exit 1
sawtrt bench serve --engine "$ENG" --kv-cache "$POLICY" --kv-memory-gib "$KV_GIB" \
  --max-num-seqs "$MAXC" --max-num-batched-tokens 8192 --concurrency "$CONC" \
  --requests-per-user 1 --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --timeout 500 \
  --server-log "$OUT/server.triton.log" --json "$OUT/server.json" > "$OUT/server.log" 2>&1 \
  || { tail -n 30 "$OUT/server.log"; exit 1; }
tail -n 8 "$OUT/server.log"

echo "== table $(date -u +%T)"
python3 - "$OUT/engine.json" "$OUT/server.json" <<'EOF' | tee "$OUT/table.md"
import json, sys
eng, srv = (json.load(open(p)) for p in sys.argv[1:3])

def levels(rec):
    """concurrency -> output tok/s, from either benchmark's JSON."""
    out = {}
    def walk(x):
        if isinstance(x, dict):
            c, t = x.get("concurrency"), x.get("output_tok_s")
            if isinstance(c, int) and isinstance(t, (int, float)):
                out[c] = x
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(rec)
    return out

e, s = levels(eng), levels(srv)
print("| c | engine-only tok/s | server tok/s | server / engine | loss | server ITL p50 ms | lost |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for c in sorted(set(e) & set(s)):
    te, ts = e[c]["output_tok_s"], s[c]["output_tok_s"]
    itl = (s[c].get("itl_s") or {}).get("p50")
    print(f"| {c} | {te:.1f} | {ts:.1f} | {ts / te:.3f} | {100 * (1 - ts / te):.1f} % | "
          f"{'-' if itl is None else f'{itl * 1e3:.1f}'} | {s[c].get('lost', '-')} |")
EOF
echo "== done $(date -u +%T)"
