#!/usr/bin/env bash
# Install cellscale into ./.venv with the CPU build of PyTorch (pinned) and every extra the
# tests use. For a GPU machine see README.md ("GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,census,ray,tensorboard]"
# the fused CPU attention kernel is compiled on first use (about a minute, once per machine), by a
# run with attention dropout (the study presets) or the tests; the demo does not use it.
# `.venv/bin/python -m cellscale.kernels` builds it ahead of time.
echo "installed: $(.venv/bin/cellscale --version)"
