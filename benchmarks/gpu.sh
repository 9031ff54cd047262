#!/usr/bin/env bash
# The GPU check (`shortcut-unlearning bench gpu`) on a CUDA machine without internet, from
# the repository's root: installs this project and the packages the machine lacks from the
# wheels in .whl/ (made by benchmarks/gpu_wheels.sh), then runs every CUDA path and the
# speed table: 6 minutes on one H200 (5.5 for the check, 0.5 to install), under 8 the limit.
# 12 epochs and 150 steps per timed run: with 3 and 60 fixed costs weighed too much.
#   bash benchmarks/gpu.sh [OUT_DIR [FLAG ...]]   (default: $OUT/gpu, else out/gpu; flags such
#                                                 as --epochs 3 override the sizes below)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-out}/gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
python3 -c "import torch, shortcut_unlearning as s; print(torch.__version__, s.__file__)"
mkdir -p "$out"
python3 -m shortcut_unlearning.cli bench gpu --device cuda --n 512 --image-size 256 \
  --batch-size 32 --epochs 12 --steps 150 --repeats 3 --out "$out" "${@:2}" 2>&1 |
  tee "$out/log.txt"
