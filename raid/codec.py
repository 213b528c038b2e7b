"""The one erasure codec of dwfs: systematic k+m codes over GF(2^8).

A code is a parity matrix M (m rows, k columns): parity_j = sum_i M[j, i] * D_i. Every level is
one of these matrices:

- m = 0: striping (raid0); k = 1: mirroring (raid1: every parity row is a copy);
- m = 1: XOR parity (raid5, raidz1);
- `md_pq`: P = XOR, Q = sum 2^i * D_i, byte-compatible with Linux md raid6;
- `zfs`: P, Q (generator 2), R (generator 4) in ZFS raidz's column order, where the first data
  column carries the highest power (Q = sum 2^(k-1-i) * D_i, R = sum 4^(k-1-i) * D_i);
- `cauchy`: Reed-Solomon k+m for any m up to 6, a Cauchy matrix scaled so that its first row is
  all ones (P stays a plain XOR); every square submatrix of a Cauchy matrix is invertible, so it
  recovers any m erasures.

Decoding any erasure pattern within tolerance solves the k x k system of surviving rows once per
pattern (cached) and applies it with the same bulk kernel as encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from raid import gf256

MAX_PARITY = 6


class TooManyErasuresError(ValueError):
    """More blocks are missing than the code can recover."""


def md_pq_matrix(k: int, m: int = 2) -> np.ndarray:
    """Parity rows of Linux md raid5/raid6: P = XOR, Q = sum 2^i * D_i."""
    if m not in (1, 2):
        raise ValueError(f"md parity has 1 or 2 rows, not {m}")
    rows = [[1] * k, [gf256.power(2, i) for i in range(k)]]
    return np.array(rows[:m], dtype=np.uint8)


def zfs_matrix(k: int, m: int) -> np.ndarray:
    """Parity rows of ZFS raidz1/2/3 (P, Q with generator 2, R with generator 4)."""
    if not 1 <= m <= 3:
        raise ValueError(f"raidz parity has 1 to 3 rows, not {m}")
    gens = [1, 2, 4][:m]
    return np.array([[gf256.power(g, k - 1 - i) for i in range(k)] for g in gens], dtype=np.uint8)


def cauchy_matrix(k: int, m: int) -> np.ndarray:
    """Reed-Solomon parity rows: a Cauchy matrix with its first row scaled to all ones."""
    if not 1 <= m <= MAX_PARITY:
        raise ValueError(f"Reed-Solomon parity count must be 1 to {MAX_PARITY}, got {m}")
    if k + m > 256:
        raise ValueError(f"k + m = {k + m} exceeds the 256 elements of GF(2^8)")
    xs = list(range(k, k + m))
    ys = list(range(k))
    c = np.array([[gf256.inv(x ^ y) for y in ys] for x in xs], dtype=np.uint8)
    # Scale every column so that row 0 is all ones; column scaling keeps the code MDS.
    for i in range(k):
        c[:, i] = gf256.MUL[gf256.INV[c[0, i]], c[:, i]]
    return c


def mirror_matrix(copies: int) -> np.ndarray:
    """Parity rows of an n-way mirror: every extra copy is the data itself."""
    return np.ones((copies - 1, 1), dtype=np.uint8)


class Codec:
    """Encodes k data blocks into m parity blocks and recovers any m lost blocks."""

    def __init__(self, parity_matrix: np.ndarray) -> None:
        self.parity = np.ascontiguousarray(parity_matrix, dtype=np.uint8)
        self.m, self.k = self.parity.shape
        self.n = self.k + self.m
        # Generator matrix: identity rows for data, then the parity rows.
        self.generator = np.concatenate([np.eye(self.k, dtype=np.uint8), self.parity])

    def encode(self, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Parity blocks (m, L) for the data blocks (k, L)."""
        if self.m == 0:
            return np.empty((0, data.shape[1]), dtype=np.uint8)
        if self.m and np.all(self.parity == 1) and self.k == 1:
            result = out if out is not None else np.empty((self.m, data.shape[1]), np.uint8)
            result[:] = data[0]
            return result
        return gf256.gf_matmul(self.parity, data, out)

    def recovery_matrix(self, present: Sequence[int], wanted: Sequence[int]) -> np.ndarray:
        """Coefficients that compute blocks `wanted` from the first k blocks of `present`.

        Block indices count data blocks 0..k-1, then parity blocks k..n-1.
        """
        return _recovery_matrix(self.generator.tobytes(), self.k, tuple(present), tuple(wanted))

    def reconstruct(self, blocks: dict[int, np.ndarray], wanted: Sequence[int]) -> np.ndarray:
        """Blocks `wanted` (len(wanted), L) computed from at least k of the given blocks."""
        present = sorted(blocks)
        if len(present) < self.k:
            raise TooManyErasuresError(
                f"{self.n - len(present)} of {self.n} blocks lost; this code recovers {self.m}"
            )
        use = _preferred_sources(present, self.k)
        coef = self.recovery_matrix(use, wanted)
        length = blocks[use[0]].shape[0]
        src = np.empty((self.k, length), dtype=np.uint8)
        for row, idx in enumerate(use):
            src[row] = blocks[idx]
        return gf256.gf_matmul(coef, src)


def _preferred_sources(present: Sequence[int], k: int) -> list[int]:
    """Data blocks first (cheapest), then parity, k in all."""
    return sorted(present)[:k]


@lru_cache(maxsize=1024)
def _recovery_matrix(
    generator_bytes: bytes, k: int, present: tuple[int, ...], wanted: tuple[int, ...]
) -> np.ndarray:
    generator = np.frombuffer(generator_bytes, dtype=np.uint8).reshape(-1, k)
    if len(present) != k:
        raise TooManyErasuresError(f"need exactly {k} sources, got {len(present)}")
    sub = generator[list(present)]
    inverse = gf256.mat_inv(sub)
    result = gf256.mat_mul(generator[list(wanted)], inverse)
    result.flags.writeable = False  # shared by the cache
    return result
