#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what `benchmarks/gpu.sh` installs on a GPU machine without
# internet: this project's wheel and the packages such a machine may lack. Run it here, with
# internet, from the repository's root; then carry .whl to the GPU machine with the checkout.
#
# The GPU machine is expected to hold Python 3.12 with torch, torchvision, numpy, scipy,
# scikit-image, scikit-learn, matplotlib, pillow, tqdm, safetensors, timm, huggingface-hub,
# packaging, click, cloudpickle, fsspec, pyyaml and toolz (the needs of the wheels below).
# All wheels here are pure Python; the platform flags only tell pip which machine they are for.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
rm -rf .whl && mkdir .whl
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  segmentation-models-pytorch==0.6.0 captum==0.9.0 platformdirs==4.14.8 \
  dask==2026.8.0 partd==1.4.2 locket==1.0.0
# This project, built from the working tree (hatchling; sample data included).
"$python" -m pip wheel --no-deps --no-build-isolation -w .whl . ||
  "$python" -m pip wheel --no-deps -w .whl .
ls -l .whl
du -sh .whl
