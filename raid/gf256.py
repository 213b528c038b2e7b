"""GF(2^8) with polynomial 0x11d: scalar arithmetic, small matrices and bulk block kernels.

This is the one GF(2^8) module of dwfs. The field is the one Linux md raid6, ZFS raidz and
SnapRAID use (x^8 + x^4 + x^3 + x^2 + 1, generator 2). Scalar tables and matrix inversion are
plain numpy/Python so that nothing on the I/O path has to import `galois` (which costs seconds);
the tests check every table and the inversion against `galois`.

The bulk kernel multiplies a matrix of field constants by a set of equal-length blocks. It works
on 64-bit words: a byte-wise multiplication by 2 of eight bytes at once is a shift, a mask and a
conditional XOR of 0x1d, so multiplying by any constant is XORing the doublings selected by the
constant's bits. numba compiles it (cached on disk) into vectorised machine code.
"""

from __future__ import annotations

import numpy as np

POLY = 0x11D
GENERATOR = 2


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[255:510] = exp[0:255]
    return exp, log


EXP, LOG = _build_tables()


def _build_mul_table() -> np.ndarray:
    a = np.arange(256)
    la = LOG[a][:, None]
    lb = LOG[a][None, :]
    table = EXP[(la + lb) % 255].astype(np.uint8)
    table[0, :] = 0
    table[:, 0] = 0
    return table


MUL = _build_mul_table()
"""MUL[a, b] = a * b in GF(2^8)."""

INV = np.zeros(256, dtype=np.uint8)
INV[1:] = EXP[(255 - LOG[np.arange(1, 256)]) % 255]
"""INV[a] = a^-1 for a != 0."""


def mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return int(MUL[a, b])


def inv(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(INV[a])


def power(a: int, n: int) -> int:
    """a raised to the integer power n (n >= 0)."""
    if n == 0:
        return 1
    if a == 0:
        return 0
    return int(EXP[(int(LOG[a]) * n) % 255])


class SingularMatrixError(ValueError):
    """The matrix has no inverse over GF(2^8)."""


def mat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over GF(2^8) of two small uint8 matrices."""
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.uint8)
    for i in range(a.shape[1]):
        out ^= MUL[a[:, i][:, None], b[i, :][None, :]]
    return out


def mat_inv(m: np.ndarray) -> np.ndarray:
    """Inverse of a small square uint8 matrix over GF(2^8) (Gauss-Jordan elimination)."""
    m = np.array(m, dtype=np.uint8)
    n = m.shape[0]
    if m.shape != (n, n):
        raise ValueError(f"matrix must be square, got shape {m.shape}")
    aug = np.concatenate([m, np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        pivots = np.nonzero(aug[col:, col])[0]
        if len(pivots) == 0:
            raise SingularMatrixError(f"matrix is singular (column {col})")
        p = col + int(pivots[0])
        if p != col:
            aug[[col, p]] = aug[[p, col]]
        aug[col] = MUL[INV[aug[col, col]], aug[col]]
        for r in range(n):
            if r != col and aug[r, col]:
                aug[r] ^= MUL[aug[r, col], aug[col]]
    return aug[:, n:].copy()


# --- bulk kernels -------------------------------------------------------------------------------

_kernel = None


def _compile_kernel():  # pragma: no cover - exercised through gf_matmul
    from numba import njit

    hi_mask = np.uint64(0x8080808080808080)
    lo_mask = np.uint64(0xFEFEFEFEFEFEFEFE)
    poly = np.uint64(0x1D)
    seven = np.uint64(7)
    one = np.uint64(1)

    @njit(cache=True, nogil=True, fastmath=False)
    def gf_matmul_words(coef, src, dst):
        rows, n = coef.shape
        words = src.shape[1]
        blk = 256
        scratch = np.empty((8, blk), dtype=np.uint64)
        for start in range(0, words, blk):
            end = min(start + blk, words)
            width = end - start
            for j in range(rows):
                for w in range(width):
                    dst[j, start + w] = 0
            for i in range(n):
                colmask = 0
                for j in range(rows):
                    colmask |= coef[j, i]
                if colmask == 0:
                    continue
                top = 0
                for b in range(8):
                    if (colmask >> b) & 1:
                        top = b
                for w in range(width):
                    scratch[0, w] = src[i, start + w]
                for b in range(1, top + 1):
                    for w in range(width):
                        x = scratch[b - 1, w]
                        scratch[b, w] = ((x << one) & lo_mask) ^ (((x & hi_mask) >> seven) * poly)
                for j in range(rows):
                    c = coef[j, i]
                    for b in range(top + 1):
                        if (c >> b) & 1:
                            for w in range(width):
                                dst[j, start + w] ^= scratch[b, w]

    return gf_matmul_words


def gf_matmul(coef: np.ndarray, src: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    """dst[j] = sum_i coef[j, i] * src[i] over GF(2^8), for byte blocks.

    `coef` is an (r, n) uint8 matrix; `src` an (n, L) uint8 array with L a multiple of 8;
    `dst`, if given, an (r, L) uint8 array that receives the result (and is returned).
    """
    global _kernel
    if _kernel is None:
        _kernel = _compile_kernel()
    coef = np.ascontiguousarray(coef, dtype=np.uint8)
    if coef.ndim != 2 or src.ndim != 2 or src.shape[0] != coef.shape[1]:
        raise ValueError(f"src shape {src.shape} does not fit coefficients {coef.shape}")
    if src.dtype != np.uint8:
        raise ValueError(f"src must be uint8, not {src.dtype}")
    length = src.shape[1]
    if length % 8:
        raise ValueError(f"block length {length} is not a multiple of 8")
    if dst is None:
        dst = np.empty((coef.shape[0], length), dtype=np.uint8)
    elif dst.dtype != np.uint8 or dst.shape != (coef.shape[0], length):
        # The compiled kernel does no bounds checking: a wrong dst would be written out of bounds.
        raise ValueError(f"dst {dst.dtype} {dst.shape} must be uint8 {(coef.shape[0], length)}")
    src = np.ascontiguousarray(src)
    _kernel(coef, src.view(np.uint64), dst.view(np.uint64))
    return dst
