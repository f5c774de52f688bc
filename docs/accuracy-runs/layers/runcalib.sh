#!/bin/bash
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt-layers OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$(dirname "$0")"
python layers.py single single_calib0.json calib:0 > single_calib0.log 2>&1 &
python layers.py single single_calib1.json calib:1 > single_calib1.log 2>&1 &
wait
