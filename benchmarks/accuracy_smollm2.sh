#!/usr/bin/env bash
# Figures: SmolLM2-135M perplexity per KV policy on same-source text (docs/accuracy.md
# "SmolLM2-135M"), the layer ranking behind int8=1+10+19, and the SmolLM2 panel of
# docs/accuracy.png.
# Machine: any CPU machine (no GPU used: the runtime path runs the PyTorch reference of the
# kernels); one BLAS thread, as the published realisations were measured (another thread count
# sums in another order: another draw of the rounding noise). About 45 minutes on 2 cores.
. "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
sawtrt eval --protocol same-source --model smollm2-135m --policies fp32,bf16,int8,int4 --json "$OUT/smollm2-main.json"
sawtrt eval --protocol same-source --model smollm2-135m --greedy 0 --no-outliers --json "$OUT/smollm2-bdr.json" \
  --policies "$(realisations int4-bdr:h=64 4),$(realisations int4-bdr:h=64,center 4),$(realisations int4-bdr:h=64,center,whiten 4)"
sawtrt eval --protocol same-source --model smollm2-135m --greedy 0 --no-outliers --json "$OUT/smollm2-served.json" \
  --policies "$(realisations int4-bdr:h=64,kv,center,whiten 16)"
sawtrt rank-layers --model smollm2-135m --policy int4-bdr:h=64,kv,center,whiten --top 3 \
  --json "$OUT/smollm2-rank.json"
sawtrt eval --protocol same-source --model smollm2-135m --greedy 0 --no-outliers --json "$OUT/smollm2-served-int8.json" \
  --policies "$(realisations int4-bdr:h=64,kv,center,whiten,int8=1+10+19 16)"
python3 benchmarks/plot_accuracy.py "$OUT/accuracy-smollm2.png" "$OUT"/smollm2-{main,bdr,served,served-int8}.json
