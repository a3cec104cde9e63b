#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs restransfer (editable) with its dev, medical and
# deploy extras. No PyTorch: torchvision .pth files are read by restransfer's own restricted reader.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,medical,deploy]"
echo "restransfer installed in $(pwd)/.venv"
