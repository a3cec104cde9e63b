#!/usr/bin/env bash
# restransfer itself on a GPU (issue 19): its pipeline from JPEG files, full fine-tuning,
# head-only with and without the feature cache, and inference through the exported
# SavedModel, each beside the pipeline's own rate. One prepared script, a few minutes on an
# H100/H200 (4,096 generated JPEGs, ResNet-50, 224 px, batch 256, 3 epochs per row).
#
# Needs, on the GPU machine, a Python with TensorFlow built for CUDA and restransfer:
#   python -m pip install "tensorflow[and-cuda]" -e .      (PY=... to choose the Python)
# then:  bash bench/gpu.sh [--images N --batch B ...]  > gpu_results.md
# Without a GPU it still runs (on the CPU) and says so in its first line; `--quick` checks the
# script in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -c "import tensorflow as tf; print('TensorFlow', tf.__version__, 'GPUs:', tf.config.list_physical_devices('GPU'))"
PYTHONUNBUFFERED=1 "$PY" bench/gpu.py "$@"
