#!/usr/bin/env bash
# The one command for a lent GPU machine (device tool), from the repository root:
#   bash benches/run_gpu_check.sh
# Builds the extensions with the machine's own python3 (torch, triton, pybind11 are in its image),
# runs every GPU check and timing, and keeps the output in $OUT (or benches/results/).
set -euo pipefail
dest="${OUT:-benches/results}"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$dest/gpu_check.txt"
MERGEALIGN_FORCE_CUDA=1 python3 setup.py build_ext --inplace 2>&1 | tail -n 3
PYTHONUNBUFFERED=1 timeout 470 python3 benches/gpu_check.py --workdir /tmp 2>&1 | tee -a "$dest/gpu_check.txt"
