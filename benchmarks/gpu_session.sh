#!/usr/bin/env bash
# What a session with a GPU runs (issue 18), in one call: GPU time is counted in minutes.
#   1. builds the extension for the card it finds (its own torch; sm_90 for H100/H200),
#   2. runs every CUDA test (pytest -m cuda; none may be skipped for lack of a GPU),
#   3. measures the GPU figures (benchmarks/gpu_truth.py) within what is left of the budget.
# Everything lands in $OUT (machine.txt, build.log, cuda-tests.log/.xml, gpu_truth.json/.log,
# copier_trace.json.gz, profiles.tgz; with KEEP_SO=1 the built extension, so that a second call
# can skip the build).
# Usage (repository root, on the GPU machine):  OUT=/some/dir bash benchmarks/gpu_session.sh [PREBUILT.so]
# (TEST_PATHS, TESTS_S, TRUTH_S and gpu_truth's GPU_TRUTH_* variables narrow a later call.)
set -u
OUT=${OUT:-/tmp/pyodlog-gpu}
PY=${PY:-python3}
TESTS_S=${TESTS_S:-240}
TRUTH_S=${TRUTH_S:-240}
TEST_PATHS=${TEST_PATHS:-tests}  # a later call of the same session may run the touched files only
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)
since() { echo "[$(($(date +%s) - started)) s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -2
  $PY -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ -n "${1:-}" ] && [ -f "$1" ]; then
  cp "$1" pyodlog/ && since "using the prebuilt extension $1"
else
  since "building"
  if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" PYODLOG_WITH_CUDA=1 \
    $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    exit 1
  fi
  since "built"
  if [ -n "${KEEP_SO:-}" ]; then  # for a second call that skips the build
    for so in pyodlog/_C*.so; do strip --strip-debug -o "$OUT/$(basename "$so")" "$so"; done
  fi
fi
$PY -c "import pyodlog, json; print(json.dumps(pyodlog.build_info()))" || exit 1

since "CUDA tests"
# shellcheck disable=SC2086  # TEST_PATHS: several paths
timeout "$TESTS_S" $PY -m pytest $TEST_PATHS -m cuda -p no:cacheprovider -q -rfE --timeout 150 -n 8 \
  --continue-on-collection-errors --junitxml="$OUT/cuda-tests.xml" >"$OUT/cuda-tests.log" 2>&1
echo "pytest exit code $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/cuda-tests.log" | tail -60

since "GPU figures"
timeout "$((TRUTH_S + 30))" $PY -m benchmarks.gpu_truth "$OUT" "$TRUTH_S" 2>&1 | tee "$OUT/gpu_truth.log" | grep -v "^ \|^{\|^}"
# One archive of the profiler tables (the device tool brings back at most 8 files).
(cd "$OUT" && tar czf profiles.tgz profile_*.txt 2>/dev/null && rm -f profile_*.txt)
since "done"
