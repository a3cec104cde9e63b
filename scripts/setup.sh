#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs restransfer (editable) with its dev extra.
# PyTorch (only for reading torchvision .pth files) is installed when this machine holds a
# local CPU wheel; otherwise the .pth tests skip and .safetensors import still works.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
torch_wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$torch_wheel" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$torch_wheel"
fi
.venv/bin/python -m pip install -q -e ".[dev,medical]"
echo "restransfer installed in $(pwd)/.venv"
