"""Kernel throughput: GB/s of the fused merge beside a memcpy of the same bytes, same run.

Bytes counted for the merge: 3 inputs read + 1 output written = 4 N itemsize.  The memcpy moves
the same traffic (2 N itemsize read + 2 N itemsize written) with the same number of threads, so
the ratio says how close the kernel comes to this machine's memory bandwidth.

    pytest benches/bench_kernel.py --benchmark-json=benches/results/kernel.json
"""

import threading

import numpy as np
import pytest

from mergealign_fast import merge_tensors
from mergealign_fast.dtypes import DType, storage_numpy_dtype

from conftest import record, settle_memory

# 32 Mi elements: 64-128 MiB per tensor, far beyond any cache, so DRAM bandwidth is measured.
N = 32 << 20
DTYPES = [DType.BF16, DType.F16, DType.F32]
ROUNDS = 10


def threaded_copy(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """np.copyto on `threads` slices at once (numpy releases the GIL while copying)."""
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    workers = [threading.Thread(target=np.copyto, args=(dst[lo:hi], src[lo:hi]))
               for lo, hi in zip(bounds[:-1], bounds[1:])]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


@pytest.fixture(scope="module")
def arrays():
    settle_memory()
    rng = np.random.default_rng(0)
    made = {}
    for dtype in DTYPES:
        store = storage_numpy_dtype(dtype)
        values = [rng.integers(0x3000, 0x3c00, N, dtype=np.uint16).view(store)
                  if dtype is not DType.F32 else rng.random(N, dtype=np.float32)
                  for _ in range(3)]
        made[dtype] = (values, np.empty(N, dtype=store))
    return made


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.short_name)
def test_memcpy_same_bytes(benchmark, arrays, dtype, threads):
    (values, _) = arrays[dtype]
    src = np.concatenate(values[:2])
    dst = np.empty_like(src)
    benchmark.pedantic(threaded_copy, args=(dst, src, threads), rounds=ROUNDS, warmup_rounds=2)
    rate = gbps(2 * src.nbytes, benchmark.stats.stats.min)
    benchmark.extra_info["GB/s"] = rate
    record(f"kernel, {N >> 20} Mi elements, best of {ROUNDS}", f"memcpy {dtype.short_name} "
           f"{threads}t", GBps=rate)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.short_name)
def test_fused_merge(benchmark, arrays, dtype, threads):
    (values, out) = arrays[dtype]
    benchmark.pedantic(merge_tensors, args=tuple(values),
                       kwargs=dict(domain_weight=0.5, align_weight=0.5, out=out,
                                   threads=threads),
                       rounds=ROUNDS, warmup_rounds=2)
    rate = gbps(4 * out.nbytes, benchmark.stats.stats.min)
    benchmark.extra_info["GB/s"] = rate
    section = f"kernel, {N >> 20} Mi elements, best of {ROUNDS}"
    from conftest import SUMMARY

    copy = SUMMARY.get(section, {}).get(f"memcpy {dtype.short_name} {threads}t", {}).get("GBps")
    ratio = f"{rate / copy:.0%}" if copy else "n/a"
    record(section, f"fused {dtype.short_name} {threads}t", GBps=rate, of_memcpy=ratio)
