#!/usr/bin/env bash
# Installs what the tests need and runs every CI stage, printing each stage's wall time.
# The budget per stage is in CONTRIBUTING.md; .ci/run calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
declare -a names=() seconds=()
run_stage() {
  local name="$1"; shift
  printf '\n== %s: %s\n' "$name" "$*"
  local start=$(date +%s)
  "$@"
  names+=("$name"); seconds+=("$(( $(date +%s) - start ))")
}

# Lint first: it needs nothing but ruff (pinned: a new ruff release must not fail CI by itself).
run_stage "lint (ruff check, ruff format --check)" bash scripts/lint.sh
run_stage "install + extension build" bash scripts/bootstrap.sh test
if command -v "${CXX:-c++}" >/dev/null; then export REC2PM_REQUIRE_EXT="${REC2PM_REQUIRE_EXT:-1}"; fi
# Tests on the real data sets fail, not skip, when the files are missing (0 skips them).
export REC2PM_REQUIRE_SHARED_DATA="${REC2PM_REQUIRE_SHARED_DATA:-1}"
# A throwaway redis-server on 127.0.0.1 for the serving integration tests (installed when
# missing), stopped when this script exits; REC2PM_REQUIRE_REDIS=1 makes those tests fail, not skip.
# The trap comes first: a start that fails half way still stops what it started.
trap 'bash scripts/services.sh stop' EXIT
run_stage "services (redis-server on 127.0.0.1)" bash scripts/services.sh start  # installs it when missing, timed
# Already running: prints its URL.
REC2PM_TEST_REDIS_URL="$(bash scripts/services.sh start)"
export REC2PM_TEST_REDIS_URL REC2PM_REQUIRE_REDIS="${REC2PM_REQUIRE_REDIS:-1}"
run_stage "unit tests" "$py" -m pytest -q -m "not slow and not aot and not gpu and not interpreter"
# Triton kernels on CPU tensors; the flag must be set before the kernels are defined.
run_stage "triton interpreter tests" env TRITON_INTERPRET=1 "$py" -m pytest -q -m interpreter tests
run_stage "slow tests (16k tokens)" "$py" -m pytest -q -m slow
run_stage "compile checks (nvcc, triton.compile; sm_80, sm_90)" env -u TRITON_INTERPRET "$py" -m pytest -q -s -m aot
run_stage "benchmarks, quick mode" "$py" -m pytest -q benchmarks/ --bench-mode quick

printf '\n== wall time per stage\n'
total=0
for i in "${!names[@]}"; do
  printf '  %-40s %5ss\n' "${names[$i]}" "${seconds[$i]}"
  total=$(( total + seconds[i] ))
done
printf '  %-40s %5ss\n' "total" "$total"
