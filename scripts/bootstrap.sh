#!/usr/bin/env bash
# Installs rec2pm (editable) with one extra into the current Python, building rec2pm_kernels._C.
#   bash scripts/bootstrap.sh test    # what the tests need
#   bash scripts/bootstrap.sh bench   # what the benchmarks need
# torch is installed only when it is not importable, pinned to 2.13.0, and only as a CPU
# build: where pip would take a CUDA build (PyPI's Linux x86_64 wheel, several GB, whose
# triton 3.7 the extras' triton pin refuses), the script stops and says how to get the CPU
# one (REC2PM_TORCH_INDEX=https://download.pytorch.org/whl/cpu) or to accept the CUDA one
# (REC2PM_ALLOW_CUDA_TORCH=1).  Prints the wall time of each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-test}"
py="${PYTHON:-python3}"
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off -q)

stage() { printf '\n== %s\n' "$1"; stage_start=$(date +%s); }
done_stage() { printf '== %s: %ss\n' "$1" "$(( $(date +%s) - stage_start ))"; }

stage "install: torch, build tools, rec2pm[$extra] without the extension"
if ! "$py" -c "import torch" 2>/dev/null; then
  torch_pip=("${pip[@]}")
  if [[ -n "${REC2PM_TORCH_INDEX:-}" ]]; then torch_pip+=(--index-url "$REC2PM_TORCH_INDEX"); fi
  # Which wheel would pip take?  A CUDA build requires NVIDIA's runtime packages.
  cuda_requirements="$("${torch_pip[@]}" --dry-run --no-deps --ignore-installed --report - "torch==2.13.0" |
    "$py" -c 'import json, sys
print(sum(d.startswith("nvidia-") for d in json.load(sys.stdin)["install"][0]["metadata"].get("requires_dist", [])))')"
  if [[ "$cuda_requirements" != 0 && "${REC2PM_ALLOW_CUDA_TORCH:-0}" != 1 ]]; then
    echo "bootstrap: pip would install a CUDA build of torch==2.13.0 here (several GB). For the CPU build:" >&2
    echo "  REC2PM_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/bootstrap.sh $extra" >&2
    echo "or install the torch you want first (the script keeps an importable torch), or accept" >&2
    echo "this one with REC2PM_ALLOW_CUDA_TORCH=1." >&2
    exit 1
  fi
  "${torch_pip[@]}" "torch==2.13.0"
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
