#!/usr/bin/env bash
# The one prepared GPU check for the Triton kernels: the tests on CUDA, then the benchmark.
# Run from the repository root on a CUDA machine; results land in $OUT (default ./bench-out).
#   bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# tests/test_triton.py runs its kernels on CUDA when a GPU is present (no interpreter).
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$OUT/tests.txt"
timeout 300 python3 -m bench.bn --device cuda --budget 0.3 --json "$OUT/bench_cuda.json" --markdown 2>&1 \
  | tee "$OUT/bench.txt"
