"""GF(2^8) with polynomial 0x11d: scalar arithmetic, small matrices and bulk block kernels.

This is the one GF(2^8) module of dwfs. The field is the one Linux md raid6, ZFS raidz and
SnapRAID use (x^8 + x^4 + x^3 + x^2 + 1, generator 2). Scalar tables and matrix inversion are
plain numpy/Python so that nothing on the I/O path has to import `galois` (which costs seconds);
the tests check every table and the inversion against `galois`.

Two bulk kernels work on equal-length byte blocks, 64 bits at a time: a byte-wise multiplication
by 2 of eight bytes is shifts, masks and a conditional XOR of 0x1d (no multiply: AVX2 has no
64-bit one). `gf_matmul` multiplies a matrix of field constants by the blocks, each result row by
Horner's rule over the bits of its coefficients (double, XOR the sources having the bit);
`gf_horner` evaluates sums of powers of 1, 2 or 4 (md/ZFS P, Q, R) by Horner's rule over the
blocks, one or two doublings per block, and can solve for lost data from such syndromes in the
same pass. numba compiles them (cached on disk, imported only on first use) into vectorised
machine code. Where the processor has GFNI with AVX-512, `gf_matmul` multiplies with the
`vgf2p8affineqb` instruction instead (one 8x8 bit matrix per coefficient, `AFFINE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike

from raid.gf256_kernels import Kernels, get_kernels

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

def _build_affine_table() -> np.ndarray:
    """For every constant c, the 8x8 bit matrix of x -> c * x as x86 GFNI's affine
    instruction takes it: byte 7 - i of the word holds the row giving bit i of the product."""
    table = np.zeros(256, dtype=np.uint64)
    columns = MUL[:, [1 << j for j in range(8)]].astype(np.uint64)  # c * x^j
    for i in range(8):
        row = np.zeros(256, dtype=np.uint64)
        for j in range(8):
            row |= ((columns[:, j] >> np.uint64(i)) & np.uint64(1)) << np.uint64(j)
        table |= row << np.uint64(8 * (7 - i))
    return table


AFFINE = _build_affine_table()

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


# --- bulk kernels: the compiled code is in raid/gf256_kernels.py ---------------------------------

_NO_COEF = np.zeros((0, 0), dtype=np.uint8)
_Dst = TypeVar("_Dst", bound="np.ndarray | Sequence[np.ndarray | None]")


Blocks: TypeAlias = np.ndarray | Sequence[np.ndarray | None]
"""Equal-length uint8 blocks: an (n, L) array or a sequence of n 1-D arrays (None: zeros)."""


def _length_of(*groups: Blocks | None) -> int:
    """The block length: of the first 2-D array or block found."""
    for blocks in groups:
        if isinstance(blocks, np.ndarray):
            if blocks.ndim != 2:
                raise ValueError(f"blocks must form a 2-D array, got shape {blocks.shape}")
            return blocks.shape[1]
        for b in blocks if blocks is not None else ():
            if b is not None:
                return np.shape(b)[-1] if np.ndim(b) else 0
    raise ValueError("no block gives the length")


def _addresses(
    kernels: Kernels,
    blocks: Blocks,
    count: int,
    length: int,
    what: str,
    copies: list[tuple[np.ndarray, np.ndarray]],
    write: bool = False,
    optional: bool = False,
) -> np.ndarray:
    """Addresses of `count` blocks of `length` bytes (0 for None, if `optional`).

    The kernels need rows of contiguous, 8-byte aligned bytes: other blocks are copied, and the
    pairs (block, copy) added to `copies` (a destination's copy is copied back afterwards).
    """
    if isinstance(blocks, np.ndarray):
        if blocks.dtype != np.uint8 or blocks.shape != (count, length):
            # The kernels do no bounds checking: a wrong block would be accessed out of bounds.
            raise ValueError(f"{what} {blocks.dtype} {blocks.shape} is not uint8 {(count, length)}")
        if write and not blocks.flags.writeable:
            raise ValueError(f"{what} is read-only")
        out = np.empty(count, dtype=np.intp)
        if not kernels.row_addresses(blocks, out):
            copy = np.empty((count, length), dtype=np.uint8)
            if not write:
                copy[...] = blocks
            copies.append((blocks, copy))
            kernels.row_addresses(copy, out)
        return out
    if len(blocks) != count:
        raise ValueError(f"{len(blocks)} {what} blocks, expected {count}")
    addresses = []
    for i, b in enumerate(blocks):
        if b is None:
            if not optional:
                raise ValueError(f"{what} block {i} is missing")
            addresses.append(0)
            continue
        if not isinstance(b, np.ndarray) or b.dtype != np.uint8 or b.shape != (length,):
            raise ValueError(f"{what} block {i} is not a uint8 array of {length} bytes")
        if write and not b.flags.writeable:
            raise ValueError(f"{what} block {i} is read-only")
        address = kernels.address(b)
        if address < 0:
            spare = b.copy() if not write else np.empty(length, dtype=np.uint8)
            copies.append((b, spare))
            address = kernels.address(spare)
        addresses.append(address)
    return np.array(addresses, dtype=np.intp)


def _length_and_dst(
    groups: tuple[Blocks | None, ...], dst: Blocks | None, rows: int
) -> tuple[int, Blocks]:
    """The checked block length, and `dst` or a new (rows, length) array."""
    length = _length_of(*groups)
    if length % 8:
        raise ValueError(f"block length {length} is not a multiple of 8")
    return length, (np.empty((rows, length), dtype=np.uint8) if dst is None else dst)


def _write_back(copies: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for target, copy in copies:
        target[...] = copy


@overload
def gf_matmul(coef: ArrayLike, src: Blocks, dst: None = None) -> np.ndarray: ...
@overload
def gf_matmul(coef: ArrayLike, src: Blocks, dst: _Dst) -> _Dst: ...


def gf_matmul(coef: ArrayLike, src: Blocks, dst: Blocks | None = None) -> Blocks:
    """dst[j] = sum_i coef[j, i] * src[i] over GF(2^8), for byte blocks.

    `coef` is an (r, n) matrix; `src` n blocks of L bytes (an (n, L) uint8 array or a sequence of
    1-D arrays), L a multiple of 8; `dst`, if given, r writable blocks (an (r, L) array or a
    sequence) that do not overlap `src`, receive the result and are returned.
    """
    kernels = get_kernels()
    coef = np.ascontiguousarray(coef, dtype=np.uint8)
    if coef.ndim != 2:
        raise ValueError(f"coefficients must be a matrix, got shape {coef.shape}")
    rows, n = coef.shape
    length, dst = _length_and_dst((src, dst), dst, rows)
    inputs: list[tuple[np.ndarray, np.ndarray]] = []
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    srcs = _addresses(kernels, src, n, length, "src", inputs)
    dsts = _addresses(kernels, dst, rows, length, "dst", outputs, write=True)
    done = 0
    if kernels.matmul_affine is not None and n:
        done = length - length % 64
        kernels.matmul_affine(AFFINE[coef], srcs, dsts, done)
    if done < length:
        kernels.matmul(coef, srcs + done, dsts + done, (length - done) // 8)
    _write_back(outputs)
    return dst


@overload
def gf_horner(
    steps: ArrayLike,
    src: Blocks,
    dst: None = None,
    tails: Blocks | None = None,
    coef: ArrayLike | None = None,
) -> np.ndarray: ...
@overload
def gf_horner(
    steps: ArrayLike,
    src: Blocks,
    dst: _Dst,
    tails: Blocks | None = None,
    coef: ArrayLike | None = None,
) -> _Dst: ...


def gf_horner(
    steps: ArrayLike,
    src: Blocks,
    dst: Blocks | None = None,
    tails: Blocks | None = None,
    coef: ArrayLike | None = None,
) -> Blocks:
    """dst = coef x y, y[j] = tails[j] + sum_i g_j^(n-1-i) * src[i], g_j = 2^steps[j] in {1, 2, 4}.

    The sums are evaluated by Horner's rule (XOR, then doubling), the way Linux md and ZFS compute
    P, Q and R: much faster than `gf_matmul` with those coefficients. A source None is a zero
    block (its power still counts); `tails`, if given, are r blocks (or None) added at the end;
    `coef`, if given, an (r', r) matrix applied to the r sums in the same pass (dst has r' rows;
    solving for lost data from syndromes). Blocks are given as for `gf_matmul`.
    """
    kernels = get_kernels()
    steps = np.ascontiguousarray(steps, dtype=np.int64)
    if steps.ndim != 1:
        raise ValueError(f"steps must be a sequence, got shape {steps.shape}")
    rows = steps.shape[0]
    if coef is None:
        solve, coef, outs = False, _NO_COEF, rows
    else:
        coef = np.ascontiguousarray(coef, dtype=np.uint8)
        if coef.ndim != 2 or coef.shape[1] != rows:
            raise ValueError(f"coefficients {coef.shape} do not fit {rows} sums")
        solve, outs = True, coef.shape[0]
    n = src.shape[0] if isinstance(src, np.ndarray) else len(src)
    length, dst = _length_and_dst((src, tails, dst), dst, outs)
    inputs: list[tuple[np.ndarray, np.ndarray]] = []
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    srcs = _addresses(kernels, src, n, length, "src", inputs, optional=True)
    if tails is None:
        tail_addrs = np.zeros(rows, dtype=np.intp)
    else:
        tail_addrs = _addresses(kernels, tails, rows, length, "tail", inputs, optional=True)
    dsts = _addresses(kernels, dst, outs, length, "dst", outputs, write=True)
    if not kernels.horner(steps, srcs, tail_addrs, solve, coef, dsts, length // 8):
        raise ValueError(f"steps must be 0, 1 or 2, got {steps}")
    _write_back(outputs)
    return dst
