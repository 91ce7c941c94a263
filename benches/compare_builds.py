"""Two builds of mergealign-fast side by side in one run: is a change a regression?

    python benches/compare_builds.py OLD_TREE NEW_TREE [--rounds 5] [--json OUT.json]

Each tree is a source checkout with its native extension built in place
(`python setup.py build_ext --inplace`), e.g. `git worktree add /tmp/old <commit>`.  Every
measurement runs in a child process with that tree first on sys.path, the two trees alternating
in each round (old, new, then new, old) from the same state: outputs written back, the page cache
dropped and compacted, the three inputs read back in (warm).  Reported: the median wall time of
end-to-end merges of the 1.1B-parameter bf16 trio (task arithmetic with and without fsync, TIES),
and kernel GB/s beside a memcpy of the same bytes measured in the same child.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import drop_file, machine_line, settle_memory  # noqa: E402

from mergealign_fast.tools.demo import default_cache_dir  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio  # noqa: E402

MERGES = {
    "merge --no-fsync": ["--no-fsync"],
    "merge (fsync)": [],
    "ties d=0.3 --no-fsync": ["--method", "ties", "--density", "0.3", "--no-fsync"],
}

# `python -m mergealign_fast` of the tree (the same in every layout the package has had).
CLI = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]; "
       "runpy.run_module('mergealign_fast', run_name='__main__')")

# 64 Mi elements per input: 128 MiB of bf16, far beyond the caches, as in bench_kernel.py.
KERNEL = """
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from mergealign_fast import merge_tensors
n, dtype, threads = 1 << 26, np.dtype(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
# Weight-like values (std 0.02, no subnormals, which x86 computes slowly): bf16 as the top half
# of the float32 bits, fp16 and fp32 converted.
def values():
    x = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02))
    if dtype == np.uint16:
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(dtype)
b, d, a = values(), values(), values()
out = np.empty_like(b)
# Written before use: pages never written all map to the kernel's one zero page, and a copy
# from them reads a single cached page (that measured 60 GB/s here).
big_in, big_out = np.ones(2 * n * dtype.itemsize, np.uint8), np.ones(2 * n * dtype.itemsize,
                                                                   np.uint8)
def best(f, k=7):
    times = []
    for _ in range(k):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times)
moved = 4 * n * dtype.itemsize
fused = best(lambda: merge_tensors(b, d, a, out=out, threads=threads))
copy = best(lambda: np.copyto(big_out, big_in))  # reads moved/2 bytes, writes moved/2
print(moved / fused / 1e9, moved / copy / 1e9)
"""


def merge_seconds(tree: Path, trio: dict, out: Path, flags) -> float:
    drop_file(out)
    settle_memory()
    subprocess.run(["sh", "-c", "cat " + " ".join(
        str(p) for f in trio.values() for p in sorted(f.glob("*.safetensors"))) + " > /dev/null"],
        check=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, str(tree), "merge", str(trio["base"]),
                    str(trio["domain"]), str(trio["aligned"]), "-o", str(out), "--quiet",
                    "--force", *flags],  # --force: an interrupted run's partial output is ours
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def kernel_gbps(tree: Path, dtype: str, threads: int):
    settle_memory()
    out = subprocess.run([sys.executable, "-c", KERNEL, str(tree), dtype, str(threads)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--kernel-only", action="store_true", help="skip the end-to-end merges")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    if not args.kernel_only:
        trio = ensure_synthetic_trio(default_cache_dir() / "bench-llama-1.1b-v1", LLAMA_1B)
        out = Path(trio["base"]).parent / "compare-out"
    results = {}
    print(machine_line(), flush=True)
    for label, flags in ({} if args.kernel_only else MERGES).items():
        times = {k: [] for k in trees}
        for r in range(args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                times[name].append(merge_seconds(trees[name], trio, out, flags))
        results[label] = {k: statistics.median(v) for k, v in times.items()}
        print(f"{label:26s} " + "  ".join(f"{k} {v:.3f} s" for k, v in results[label].items())
              + f"   (rounds: {times})", flush=True)
    if not args.kernel_only:
        drop_file(out)
    for dtype in ("uint16", "float16", "float32"):  # uint16: bf16 bits
        for threads in (1, 2):
            row = {}
            for r in range(3):
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    row.setdefault(name, []).append(kernel_gbps(trees[name], dtype, threads))
            label = f"kernel {'bf16' if dtype == 'uint16' else dtype} {threads}t GB/s"
            results[label] = {k: (statistics.median(f for f, _ in v),
                                  statistics.median(c for _, c in v)) for k, v in row.items()}
            print(f"{label:26s} " + "  ".join(f"{k} {f:.1f} (memcpy {c:.1f})"
                                              for k, (f, c) in results[label].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "results": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
