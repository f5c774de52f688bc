#!/usr/bin/env bash
# Figure: the synthetic outlier study (docs/accuracy-synthetic.md): attention-output error of each
# KV policy on keys with four massive channels, 20 seeds. Machine: any CPU; about a minute.
. "$(dirname "$0")/common.sh"
python3 -m sawtrt.studies.outliers | tee "$OUT/outliers-synthetic.txt"
