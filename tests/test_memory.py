"""Bounded memory: peak RSS (mapped input pages included) does not grow with the model.

Merges a trio whose inputs total 3 x 192 MB and whose single tensor is larger than the whole
bound: without releasing processed input pages the mapped inputs alone would push the resident
set past 576 MB.
"""

import subprocess
import sys

import numpy as np
import pytest

from mergealign_fast.dtypes import DType
from mergealign_fast.tools.synthetic import LlamaShape, ensure_synthetic_trio

# One 96M-element embedding dominates: 192 MB per model in bf16.
BIG_EMBEDDING = LlamaShape(hidden=3072, intermediate=64, layers=1, heads=1, kv_heads=1,
                           vocab=15625)
PEAK_RSS_LIMIT = 256 << 20  # interpreter + numpy (~40 MB) + 3 windows of 32 MiB + slack

CHILD = """
import sys
from pathlib import Path
from mergealign_fast import merge_checkpoints
root = Path(sys.argv[1])
merge_checkpoints(root / "base", root / "domain", root / "aligned", root / "out", force=True)
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


@pytest.mark.slow
def test_peak_rss_stays_bounded(tmp_path):
    ensure_synthetic_trio(tmp_path, BIG_EMBEDDING, dtype=DType.BF16)
    input_bytes = 3 * BIG_EMBEDDING.parameters * 2
    assert input_bytes > 2 * PEAK_RSS_LIMIT  # the test could fail if pages were kept
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, check=True)
    peak = int(proc.stdout.strip())
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    assert np.isclose((tmp_path / "out" / "model.safetensors").stat().st_size,
                      BIG_EMBEDDING.parameters * 2, rtol=0.01)
