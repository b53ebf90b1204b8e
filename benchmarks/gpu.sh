#!/usr/bin/env bash
# GPU checks and kernel benchmarks for a machine with a CUDA device; about 6 minutes in all
# (up to 5 more when the CUDA kernels are built).
#
#   bash benchmarks/gpu.sh                   # results in $OUT, else benchmarks/results/gpu
#
# Stages, in order, each under its own `timeout` (seconds; override with the variable named):
#   env           versions and nvidia-smi                                  T_ENV=10
#   install       pip install --no-deps --no-build-isolation -e .          T_INSTALL=40
#                 (REC2PM_BUILD_EXT=0: no C++ CPU build; REC2PM_GPU_SKIP_INSTALL=1 skips it)
#   smoke         benchmarks/gpu_smoke.py: Triton vs torch backend, bf16  T_SMOKE=60
#   cuda-build    the extension with its CUDA kernels (when nvcc is found)   T_CUDA_BUILD=240
#   cuda-kernels  pytest -m "gpu and cuda_kernels": the CUDA kernels against  T_CUDA_TESTS=60
#                 the oracle (the shared kernel tests' `cuda` target);
#                 writes cuda-validation.json (what `auto` waits for)
#   gpu-tests     pytest -m "gpu and not cuda_kernels" tests/                T_TESTS=120
#   bench-cached  benchmarks/test_cached_step.py                           T_BENCH_CACHED=20
#   bench-segment benchmarks/test_segment_attention.py: SDPA, flash-attn   T_BENCH_SEGMENT=45
#                 and the triton backend
#   bench-flex    the same file: FlexAttention (and the SDPA baseline)     T_BENCH_FLEX=20
#   bench-torch   the same file: the torch backend (and SDPA)              T_BENCH_TORCH=15
#   bench-hstu    benchmarks/test_hstu_masks.py: HSTU's masks on Triton    T_BENCH_HSTU=20
# The defaults add up to about 6 minutes; a full-mode run needs larger values (T_BENCH_*).
# Benchmarks run in --bench-mode ${REC2PM_GPU_BENCH_MODE:-full} (quick when there is no CUDA
# device: a dry run).  Each stage writes its log (and JSON) into the results folder as it
# finishes; pytest stages get SIGINT at their timeout, so they still print their tables and
# save the results that ran.  A failed stage does not stop the next one; summary.tsv holds
# every stage's exit status and duration, and the script exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR/bench"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.tsv"
printf 'stage\texit\tseconds\tlog\n' > "$SUMMARY"

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PY
export REC2PM_AUTOTUNE_MAX_CONFIGS="${REC2PM_AUTOTUNE_MAX_CONFIGS:-2}"
export PYTHONUNBUFFERED=1

failed=0
n=0
# run_stage NAME SECONDS CMD...: runs CMD under `timeout`, its output to the terminal and to NN-NAME.log.
run_stage() {
  local name="$1" limit="$2"; shift 2
  n=$((n + 1))
  local log
  log="$OUT_DIR/$(printf '%02d' "$n")-$name.log"
  printf '\n== %s (timeout %ss): %s\n' "$name" "$limit" "$*" | tee "$log"
  local start rc
  start=$(date +%s)
  # SIGINT first (pytest then reports and saves what ran), SIGKILL 10 s later if still alive.
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local seconds=$(( $(date +%s) - start ))
  [ "$rc" -eq 124 ] && echo "== $name: timed out after ${limit}s" | tee -a "$log"
  printf '== %s: exit %s in %ss\n' "$name" "$rc" "$seconds" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$(basename "$log")" >> "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
}

env_report() {
  echo "python: $("$PY" --version 2>&1) ($(command -v "$PY"))"
  "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton: not importable ({exc})")
EOF
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  echo "REC2PM_AUTOTUNE_MAX_CONFIGS=$REC2PM_AUTOTUNE_MAX_CONFIGS"
}

install_package() {
  if [ "${REC2PM_GPU_SKIP_INSTALL:-0}" = 1 ]; then
    echo "REC2PM_GPU_SKIP_INSTALL=1: using the installed package"
    return 0
  fi
  # No index and no version check: the GPU machine reaches no registry, and --no-deps needs none.
  REC2PM_BUILD_EXT=0 "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check \
    --no-input -e .
}

build_cuda_extension() {
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    echo "torch has no CUDA: the CUDA kernels are not built (backend='cuda' stays unavailable)"
    return 0
  fi
  if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    echo "nvcc not found: the CUDA kernels are not built (backend='cuda' stays unavailable)"
    return 0
  fi
  REC2PM_BUILD_EXT=1 REC2PM_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-deps \
    --no-build-isolation --no-index --disable-pip-version-check --no-input -e .
}

# The CUDA kernels against the oracle, and a record of the outcome beside the results.
validate_cuda_kernels() {
  "$PY" -m pytest -q -m "gpu and cuda_kernels" tests/kernels -p no:cacheprovider \
    --junitxml="$OUT_DIR/cuda-kernels.xml"
  local rc=$?
  "$PY" benchmarks/cuda_validation.py "$OUT_DIR/cuda-kernels.xml" "$rc" "$OUT_DIR/cuda-validation.json"
  return "$rc"
}

export -f env_report install_package build_cuda_extension validate_cuda_kernels  # `timeout` runs programs, so the two shell functions run through bash -c
run_stage env "${T_ENV:-10}" bash -c env_report
has_cuda=0
timeout 30 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && has_cuda=1
if [ "$has_cuda" = 1 ]; then
  bench_mode="${REC2PM_GPU_BENCH_MODE:-full}"
else
  bench_mode="${REC2PM_GPU_BENCH_MODE:-quick}"
  echo "== no CUDA device: a dry run; benchmarks in --bench-mode $bench_mode on CPU"
fi

run_stage install "${T_INSTALL:-40}" bash -c install_package
run_stage smoke "${T_SMOKE:-60}" "$PY" benchmarks/gpu_smoke.py
run_stage cuda-build "${T_CUDA_BUILD:-240}" bash -c build_cuda_extension
run_stage cuda-kernels "${T_CUDA_TESTS:-60}" bash -c validate_cuda_kernels
run_stage gpu-tests "${T_TESTS:-120}" "$PY" -m pytest -q -m "gpu and not cuda_kernels" tests/ -p no:cacheprovider \
  --junitxml="$OUT_DIR/gpu-tests.xml"
bench=("$PY" -m pytest -q -p no:cacheprovider --bench-mode "$bench_mode" --bench-results "$OUT_DIR/bench")
run_stage bench-cached "${T_BENCH_CACHED:-20}" "${bench[@]}" benchmarks/test_cached_step.py
# segment_attention in three runs, most important first; each repeats the SDPA baseline for its ratio tables.
segment=benchmarks/test_segment_attention.py
run_stage bench-segment "${T_BENCH_SEGMENT:-45}" "${bench[@]}" "$segment" -k "sdpa or flash_attn or triton"
run_stage bench-flex "${T_BENCH_FLEX:-20}" "${bench[@]}" "$segment" -k "sdpa or flex"
run_stage bench-torch "${T_BENCH_TORCH:-15}" "${bench[@]}" "$segment" -k "sdpa or torch"
run_stage bench-hstu "${T_BENCH_HSTU:-20}" "${bench[@]}" benchmarks/test_hstu_masks.py -k triton

printf '\n== summary (%s)\n' "$SUMMARY"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
exit "$failed"
