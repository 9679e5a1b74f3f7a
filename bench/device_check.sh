#!/usr/bin/env bash
# The one prepared GPU check for the Triton kernels, for a single device-tool command (600 s):
#   1. bench/cuda_correctness.py: the kernels against float64 F.batch_norm, torch and Triton only;
#   2. tests/test_triton.py on CUDA, when pytest and hypothesis are installed;
#   3. the benchmark (bench/bn.py); 4. the knob sweep (bench/tune_triton.py).
# A failing or timed-out correctness step stops the script (exit 1) before any benchmark.
# Step limits: 200 + 130 + 130 + 60 = 520 s, cold kernel compilation included. The tests step
# running out of time (each new shape compiles) is reported and does not stop the benchmark.
# Run from the repository root on a CUDA machine; every result lands in $OUT (default ./bench-out).
#   bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout, output to the terminal and $OUT/NAME.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  note "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  return "$rc"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} | tee "$OUT/gpu.txt"

if ! step correctness 200 python3 -m bench.cuda_correctness --device cuda; then
  note "STOPPED: bench/cuda_correctness.py failed (see $OUT/correctness.txt); no benchmark was run"
  exit 1
fi
if python3 -c "import pytest, hypothesis" 2>/dev/null; then
  # The compile check and the tuning smoke test need no GPU (CI runs them); step 4 runs the sweep.
  step tests 130 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py \
    -k "not compile_for_hopper and not tuning_script"
  rc=$?
  if [ "$rc" = 124 ]; then
    note "tests: ran out of time (not a failure; see $OUT/tests.txt)"
  elif [ "$rc" != 0 ]; then
    note "STOPPED: tests/test_triton.py failed on CUDA (see $OUT/tests.txt); no benchmark was run"
    exit 1
  fi
else
  note "tests: skipped (pytest or hypothesis not installed); bench/cuda_correctness.py passed"
fi
step bench 130 python3 -m bench.bn --device cuda --budget 0.3 --json "$OUT/bench_cuda.json" --markdown
step tune 60 python3 -m bench.tune_triton --max-seconds 40 --json "$OUT/tune.json"
note "done: results in $OUT"
