#!/usr/bin/env bash
# Figure: SmolLM2-135M perplexity with the two prompt semantics (docs/accuracy.md "Prompt
# tokens: cache or fresh"): `cache` (every query reads the quantized pages, its own chunk
# included) vs `fresh` (128-token chunks attend to their own K/V unquantized and to earlier
# chunks through the pages), 2 x 512 tokens of the same-source text in windows of 256.
# Machine: any CPU machine, one thread. A few minutes on 2 cores.
. "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for mode in cache fresh; do
  sawtrt eval --protocol same-source --model smollm2-135m --policies fp32,int4,int4-bdr \
    --tokens 512 --window 256 --greedy 0 --no-outliers --threads 1 --prefill-kv "$mode" \
    --json "$OUT/smollm2-prefill-kv-$mode.json"
done
