#!/usr/bin/env bash
# The one prepared GPU check for the Triton kernels: the tests on CUDA, the benchmark, then the
# knob sweep (bench/tune_triton.py). The time limits add up to 570 s, under the device tool's
# 600 s per command.
# Run from the repository root on a CUDA machine; results land in $OUT (default ./bench-out).
#   bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# tests/test_triton.py runs its kernels on CUDA when a GPU is present (no interpreter).
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$OUT/tests.txt"
timeout 240 python3 -m bench.bn --device cuda --budget 0.3 --json "$OUT/bench_cuda.json" --markdown 2>&1 \
  | tee "$OUT/bench.txt"
timeout 150 python3 -m bench.tune_triton --max-seconds 120 --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.txt"
