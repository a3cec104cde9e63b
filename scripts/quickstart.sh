#!/usr/bin/env bash
# The main job on a fresh machine: create the environment, install, fine-tune, evaluate,
# export for TensorFlow Serving, and print where the model went. No network needed.
#   bash scripts/quickstart.sh                 # scikit-learn's bundled digits
#   bash scripts/quickstart.sh path/to/images  # your image folder (class sub-folders)
# Extra arguments go to `restransfer quickstart` (e.g. --weights file.pth --epochs 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/restransfer quickstart "$@"
