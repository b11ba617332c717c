#!/usr/bin/env bash
# Installs nvcc, the CUDA headers and libdevice from PyPI into .cuda/ (ignored by git), where
# build.rs finds them. Pinned to CUDA 13.0: the H100 machines run driver 580 (CUDA 13.0), and
# PTX from a newer nvcc would not load there. Quick and idempotent once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
want=13.0
dest=.cuda
marker="$dest/.installed-$want"
if [ -f "$marker" ] && [ -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  echo "nvcc $want already in $dest"
  exit 0
fi
python3 -m pip install --quiet --no-deps --upgrade --target "$dest" \
  "nvidia-cuda-nvcc==$want.*" "nvidia-nvvm==$want.*" "nvidia-cuda-runtime==$want.*" \
  "nvidia-cuda-crt==$want.*" "nvidia-cuda-cccl==$want.*"
"$dest/nvidia/cu13/bin/nvcc" --version | tail -n 2
touch "$marker"
