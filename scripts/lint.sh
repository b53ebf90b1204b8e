#!/usr/bin/env bash
# ruff check (E, F, I, B, UP; pyproject.toml) and ruff format --check over the tree.
#   bash scripts/lint.sh          # what CI runs
#   bash scripts/lint.sh --fix    # apply the safe fixes and the formatting instead
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
ruff_version="0.17.6"  # also in .pre-commit-config.yaml
if [ "$("$py" -m ruff --version 2>/dev/null)" != "ruff $ruff_version" ]; then
  "$py" -m pip install --disable-pip-version-check --progress-bar off -q "ruff==$ruff_version"
fi
if [ "${1:-}" = "--fix" ]; then
  "$py" -m ruff check --fix .
  "$py" -m ruff format .
else
  "$py" -m ruff check .
  "$py" -m ruff format --check .
fi
