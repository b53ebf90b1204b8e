#!/usr/bin/env bash
# Installs rec2pm (editable) with one extra into the current Python, building rec2pm_kernels._C.
#   bash scripts/bootstrap.sh test    # what the tests need
#   bash scripts/bootstrap.sh bench   # what the benchmarks need
# torch is installed only when it is not importable, pinned to 2.13.0 (a CPU build here),
# so pip never pulls a multi-GB CUDA build.  Prints the wall time of each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-test}"
py="${PYTHON:-python3}"
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off -q)

stage() { printf '\n== %s\n' "$1"; stage_start=$(date +%s); }
done_stage() { printf '== %s: %ss\n' "$1" "$(( $(date +%s) - stage_start ))"; }

stage "install: torch, build tools, rec2pm[$extra] without the extension"
if ! "$py" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" ninja setuptools wheel
REC2PM_BUILD_EXT=0 "${pip[@]}" --no-build-isolation -e ".[$extra]"
done_stage install

stage "extension build: rec2pm_kernels._C"
if command -v "${CXX:-c++}" >/dev/null; then
  REC2PM_BUILD_EXT=1 MAX_JOBS="${MAX_JOBS:-2}" "${pip[@]}" --no-build-isolation --no-deps -e .
else
  echo "no C++ compiler: rec2pm_kernels runs on its torch backend without the extension"
fi
done_stage "extension build"
"$py" -c "import rec2pm_kernels as rk; [print(f'  {s.name:<7} {\"yes\" if s.available else \"no \"}  {s.reason}') for s in rk.backends().values()]"
