"""Low-rank factors of a task vector: τ ≈ B·A with B = U·√S and A = √S·Vᵀ (or B = U, A = S·Vᵀ),
from a truncated SVD of τ in fp32 (extract_lora.py).

Small matrices get the exact SVD (LAPACK).  Larger ones a randomized one (Halko, Martinsson and
Tropp 2011, algorithm 4.4): the range of τ sampled by a Gaussian test matrix of k = rank +
OVERSAMPLING columns, sharpened by POWER_ITERATIONS passes of τ·τᵀ with re-orthonormalisation,
then the exact SVD of the small k x n projection.  The test matrix is drawn by numpy's PCG64
from a seed and the tensor's name, so an extraction gives the same adapter on any machine (to
the rounding of its BLAS).  Memory: τ, the factors and a few m x k and k x n matrices.

The error reported is that of the factors as stored: ‖τ − B·A‖_F / ‖τ‖_F, with B·A rebuilt in
row blocks by the native low_rank_add.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Extra sampled directions beyond the rank: Halko et al. find 5-10 enough for the leading
# singular vectors; 10 costs ~15% more at rank 64.
OVERSAMPLING = 10
# Passes of τ·τᵀ: with 2 the kept singular values of a slowly decaying spectrum are within a
# few percent of the exact ones (Halko et al. §10); each pass costs two products with τ.  On
# the flattest spectrum, noise (the 1.1B bench pair's synthetic τ, a 5632 x 2048 MLP weight at
# rank 64): error 0.968 against the exact 0.962 in 0.11 s; 4 passes 0.965 in 0.16 s.
POWER_ITERATIONS = 2
# Below this many rows or columns the exact SVD is as fast as the randomized one (a 1024 x n
# LAPACK SVD takes ~0.3 s on 2 cores) and has no sampling error.
EXACT_BELOW = 1024
# Rows of B·A rebuilt at once to measure the error: 64 Ki elements of a 2048-wide tensor.
ERROR_ROWS = 32


@dataclass
class Factors:
    a: np.ndarray  # rank x n
    b: np.ndarray  # m x rank
    singular_values: np.ndarray  # the ones kept
    exact: bool  # the exact SVD (else randomized)


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class Linalg:
    """The SVD's arithmetic on numpy (the CPU), or torch on a device (or, torch=True, on the
    CPU: how the tests run the GPU's code): the same algorithm."""

    def __init__(self, device: str = "cpu", torch: bool = False):
        self.device = device
        self.torch = None
        if device != "cpu" or torch:
            import torch

            self.torch = torch

    def put(self, array: np.ndarray):
        if self.torch is None:
            return array
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def get(self, value) -> np.ndarray:
        if self.torch is None:
            return np.ascontiguousarray(value, dtype=np.float32)
        return np.ascontiguousarray(value.float().cpu().numpy())

    def qr(self, value):
        if self.torch is None:
            return np.linalg.qr(value)[0]
        return self.torch.linalg.qr(value)[0]

    def svd(self, value):
        if self.torch is None:
            return np.linalg.svd(value, full_matrices=False)
        return self.torch.linalg.svd(value, full_matrices=False)


def truncated_svd(tau: np.ndarray, max_rank: int, name: str, seed: int = 0,
                  linalg: Optional[Linalg] = None, exact: bool = False):
    """(U, S, Vᵀ) of the leading min(max_rank, min(m, n)) singular triplets of τ (fp32, m x n);
    exact when asked or when the matrix is small (EXACT_BELOW), else randomized and seeded by
    `name`."""
    linalg = linalg or Linalg()
    m, n = tau.shape
    rank = min(max_rank, m, n)
    sampled = rank + OVERSAMPLING
    if exact or min(m, n) < EXACT_BELOW or sampled >= min(m, n):
        u, s, vt = (linalg.get(x) for x in linalg.svd(linalg.put(tau)))
        return u[:, :rank], s[:rank], vt[:rank], True
    rng = np.random.Generator(np.random.PCG64(_seed(seed, name)))
    t = linalg.put(tau)
    q = linalg.qr(t @ linalg.put(rng.standard_normal((n, sampled), dtype=np.float32)))
    for _ in range(POWER_ITERATIONS):
        q = linalg.qr(t @ linalg.qr(t.T @ q))
    ub, s, vt = linalg.svd(q.T @ t)
    u = linalg.get(q @ ub)
    return u[:, :rank], linalg.get(s)[:rank], linalg.get(vt)[:rank], False


def factors(tau: np.ndarray, max_rank: int, name: str, *, sv_epsilon: float = 0.0,
            distribute_scale: bool = True, seed: int = 0, linalg: Optional[Linalg] = None,
            exact: bool = False) -> Factors:
    """B, A with B·A the best rank-r approximation of τ found: r = max_rank, or fewer where
    singular values are at most sv_epsilon (mergekit's --sv-epsilon).  A τ of zeros gets rank 0."""
    u, s, vt, exact = truncated_svd(tau, max_rank, name, seed, linalg, exact)
    keep = int(np.count_nonzero(s > max(sv_epsilon, 0.0)))
    u, s, vt = u[:, :keep], s[:keep], vt[:keep]
    if distribute_scale:
        root = np.sqrt(s)
        b, a = u * root, root[:, None] * vt
    else:
        b, a = u, s[:, None] * vt
    return Factors(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32),
                   s, exact)


def relative_error(tau: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    """‖τ − B·A‖_F / ‖τ‖_F in float64 sums (0 for τ = 0), B·A rebuilt in blocks of rows by the
    native kernel, so the error is that of the factors given (as stored, e.g. rounded to bf16
    and widened back)."""
    from ..kernels import cpu

    native = cpu.native()
    m, n = tau.shape
    rank = a.shape[0]
    total = float(np.dot(tau.ravel().astype(np.float64), tau.ravel().astype(np.float64)))
    if total == 0.0:
        return 0.0
    if rank == 0:
        return 1.0
    tau = np.ascontiguousarray(tau, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    a = np.ascontiguousarray(a, np.float32)
    residual = np.empty((ERROR_ROWS, n), np.float32)
    left = 0.0
    for first in range(0, m, ERROR_ROWS):
        rows = min(ERROR_ROWS, m - first)
        native.low_rank_add(residual.ctypes.data, 0, tau[first].ctypes.data, 0,
                            b[first].ctypes.data, a.ctypes.data, rows, rank, n, 0, n, -1.0,
                            cpu.default_threads())
        block = residual[:rows].astype(np.float64)
        left += float(np.sum(block * block))
    return float(np.sqrt(left / total))
