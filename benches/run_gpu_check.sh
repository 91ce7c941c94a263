#!/usr/bin/env bash
# The one command for a lent GPU machine (device tool), from the repository root:
#   bash benches/run_gpu_check.sh
# Builds the extensions offline with the machine's own python3 (torch, triton, pybind11 are in
# its image; nothing is fetched), keeps the whole build log, runs every GPU check and timing, and
# keeps the output in $OUT (or benches/results/).  The check fails, not skips, when the CUDA
# backend cannot run.  Budget: <= 8 minutes on an H200, build included.
set -euo pipefail
dest="${OUT:-benches/results}"
mkdir -p "$dest"
stamp="$(date -u +%Y%m%d)"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr ' ' '-')"
log="$dest/gpu-check-$gpu-$stamp.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$log"
if ! MERGEALIGN_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$dest/gpu-build-$stamp.log" 2>&1; then
    tail -n 40 "$dest/gpu-build-$stamp.log" | tee -a "$log"
    echo "| build | failed | builds | FAIL |" | tee -a "$log"
    exit 1
fi
echo "build: ok ($(grep -c nvcc "$dest/gpu-build-$stamp.log") nvcc steps; log $dest/gpu-build-$stamp.log)" | tee -a "$log"
PYTHONUNBUFFERED=1 timeout 420 python3 benches/gpu_check.py --workdir /tmp 2>&1 | tee -a "$log"
