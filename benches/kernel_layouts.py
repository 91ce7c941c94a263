"""One thread of the kernel against the fastest memcpy, for two input layouts, build by build.

    python benches/kernel_layouts.py TREE [TREE ...] [--rounds 3]

Each TREE is a source checkout with its native extension built in place.  Per round, each tree
runs in a child process of its own (trees alternating), which times, best of 10 with memcpy and
kernel rounds alternating, bf16 and fp32 task arithmetic on 32 Mi elements per input, one thread,
for inputs that are one array split in three (the same offset modulo 128 MiB) and three arrays
allocated apart.  The floor is a memcpy of 256 MiB: glibc 2.36 copies 128 MiB at about half the
speed it copies 256 MiB here (a different strategy above ~192 MiB), so this is the stricter floor
beside `mergealign-fast bench`'s memcpy of the same bytes.
"""

import argparse
import subprocess
import sys

CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from mergealign_fast.kernels import cpu
from mergealign_fast.engine.in_memory import merge_tensors

native, n = cpu.native(), 32 << 20
x = np.random.default_rng(0).standard_normal(3 * n, dtype=np.float32) * np.float32(0.02)
stored = {"bf16": (x.view(np.uint32) >> 16).astype(np.uint16), "fp32": x.copy()}
src = np.ones(8 * n, np.uint8)
dst = np.ones_like(src)
cells = []
for layout in ("split", "apart"):
    for name, values in stored.items():
        inputs = np.split(values, 3)
        if layout == "apart":
            inputs = [part.copy() for part in inputs]
        out = np.empty_like(inputs[0])
        copy = kernel = float("inf")
        for _ in range(10):
            started = time.perf_counter()
            native.copy_threads(dst.ctypes.data, src.ctypes.data, src.nbytes, 1)
            copy = min(copy, time.perf_counter() - started)
            started = time.perf_counter()
            merge_tensors(*inputs, out=out, threads=1)
            kernel = min(kernel, time.perf_counter() - started)
        ratio = 4 * out.nbytes / kernel / (2 * src.nbytes / copy)
        cells.append(f"{layout} {name} {4 * out.nbytes / kernel / 1e9:.1f} GB/s {ratio:.0%}")
print(" | ".join(cells), f"| memcpy {2 * src.nbytes / copy / 1e9:.1f} GB/s")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for tree in args.trees:
            row = subprocess.run([sys.executable, "-c", CHILD, tree], check=True,
                                 capture_output=True, text=True).stdout.strip()
            print(f"{tree}: {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
