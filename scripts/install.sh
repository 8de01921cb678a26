#!/usr/bin/env bash
# Install cellscale into ./.venv with the CPU build of PyTorch (pinned) and every extra the
# tests use. For a GPU machine see README.md ("GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,census,ray,tensorboard]"
# compile the fused CPU attention kernel now (about a minute, once) rather than at the first run;
# without a C++ compiler training still works, on a slower attention path
.venv/bin/python -m cellscale.kernels || true
echo "installed: $(.venv/bin/cellscale --version)"
