#!/bin/bash
# two single-threaded jobs at a time (the documented baseline values are single-threaded runs)
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt-layers OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$(dirname "$0")"
job() { set -- $1; f=$1; l=$2; shift 2; python layers.py ppl "ppl_${f}_${l}.jsonl" "$f" "$l" "$@" 2>&1 | grep -v -i warn; }
export -f job
xargs -P 2 -I{} bash -c 'job "{}"' < "${1:-jobs.txt}" >> runs.log
