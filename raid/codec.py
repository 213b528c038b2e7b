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

Parity rows whose coefficients are powers of 1, 2 or 4 in column order (md P and Q, ZFS P, Q, R,
XOR, mirror copies) are computed by Horner's rule, several times faster than the generic kernel.
Decoding plans each erasure pattern once (cached). Lost data blocks of such a code come from
syndromes, the way md raid6 recovers: one Horner pass over the surviving data and as many
surviving parity rows as data blocks are lost, applying the small inverse that turns syndromes
into data in the same pass. Other patterns solve the k x k system of the first k surviving blocks
and apply it with `gf_matmul`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
        self._steps, self._reversed = _horner_form(self.parity)
        self._horner = bool((self._steps >= 0).all())  # every parity row is a Horner row
        # Data blocks in the order Horner's rule takes them.
        self._order = tuple(range(self.k))[:: -1 if self._reversed else 1]
        self._plans: dict[tuple[tuple[int, ...], tuple[int, ...]], _Plan] = {}

    def encode(self, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Parity blocks (m, L) for the data blocks (k, L)."""
        if self.m == 0:
            return np.empty((0, data.shape[1]), dtype=np.uint8)
        if data.ndim != 2 or data.shape[0] != self.k:
            raise ValueError(f"data shape {data.shape} is not ({self.k}, L)")
        if self._horner:
            return gf256.gf_horner(self._steps, data[:: -1 if self._reversed else 1], out)
        return gf256.gf_matmul(self.parity, data, out)

    def recovery_matrix(self, present: Sequence[int], wanted: Sequence[int]) -> np.ndarray:
        """Coefficients that compute blocks `wanted` from the first k blocks of `present`.

        Block indices count data blocks 0..k-1, then parity blocks k..n-1.
        """
        return _recovery_matrix(self.generator.tobytes(), self.k, tuple(present), tuple(wanted))

    def reconstruct(self, blocks: dict[int, np.ndarray], wanted: Sequence[int]) -> np.ndarray:
        """Blocks `wanted` (len(wanted), L) computed from at least k of the given blocks."""
        if len(blocks) < self.k:
            raise TooManyErasuresError(
                f"{self.n - len(blocks)} of {self.n} blocks lost; this code recovers {self.m}"
            )
        key = (tuple(sorted(blocks)), tuple(wanted))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 1024:
                self._plans.clear()
            plan = self._plans[key] = self._plan(*key)
        out = np.empty((len(key[1]), len(next(iter(blocks.values())))), dtype=np.uint8)
        plan.run(blocks, out)
        return out

    def _plan(self, present: tuple[int, ...], wanted: tuple[int, ...]) -> _Plan:
        """How to compute the blocks `wanted` from the blocks `present`: lost data blocks from
        syndromes if the first surviving parity rows are Horner rows, then lost parity blocks by
        encoding; else all at once from the first k blocks (`recovery_matrix`).
        """
        k = self.k
        layout = _Layout(present, wanted)
        lost = [i for i in dict.fromkeys(wanted) if i not in layout.given]
        lost_data = [i for i in range(k) if i not in layout.given]
        lost_parity = [i for i in lost if i >= k]
        if lost_data and lost:
            rows = [j for j in range(self.m) if k + j in layout.given][: len(lost_data)]
            inverse = self._syndrome_inverse(rows, lost_data)
            if inverse is None:
                use = _preferred_sources(present, k)
                layout.matmul(self.recovery_matrix(use, lost), use, lost)
                return layout.plan()
            order = [-1 if i in lost_data else i for i in self._order]
            tails = [k + j for j in rows]
            targets = lost_data if lost_parity else [i for i in lost_data if i in lost]
            # The syndromes of parity rows `rows` times the inverse (skipped if it is 1).
            solve = inverse[[lost_data.index(i) for i in targets]]
            coef = None if inverse.tolist() == [[1]] else solve
            layout.horner(self._steps[rows], order, targets, tails, coef)
        if lost_parity:
            rows = [i - k for i in lost_parity]
            if (self._steps[rows] >= 0).all():
                layout.horner(self._steps[rows], list(self._order), lost_parity)
            else:
                layout.matmul(self.parity[rows], list(range(k)), lost_parity)
        return layout.plan()

    def _syndrome_inverse(self, rows: list[int], lost_data: list[int]) -> np.ndarray | None:
        """The inverse that turns the syndromes of parity `rows` into the lost data blocks, or
        None if those rows are not all Horner rows or cannot recover these blocks."""
        if not (self._steps[rows] >= 0).all():
            return None
        try:
            return gf256.mat_inv(self.parity[np.ix_(rows, lost_data)])
        except gf256.SingularMatrixError:
            return None


# Where a block of a decoding plan is: (place, index) with place _GIVEN (index: the block's
# number), _OUT (a row of the result) or _SCRATCH (a row of a scratch array).
_GIVEN, _OUT, _SCRATCH = -1, 0, 1
_Ref = tuple[int, int]


@dataclass(frozen=True, eq=False)
class _Rows:
    """Blocks that a step reads or writes (None: a zero block)."""

    refs: tuple[_Ref | None, ...]
    span: tuple[int, int, int] | None  # (place, start, stop): consecutive rows of one array

    @classmethod
    def of(cls, refs: Sequence[_Ref | None]) -> _Rows:
        span = None
        first = refs[0] if refs else None
        if first is not None and first[0] != _GIVEN:
            place, start = first
            if list(refs) == [(place, start + i) for i in range(len(refs))]:
                span = (place, start, start + len(refs))
        return cls(tuple(refs), span)

    def get(
        self, blocks: dict[int, np.ndarray], arrays: tuple[np.ndarray, np.ndarray]
    ) -> gf256.Blocks:
        """The blocks: one 2-D array if they are consecutive rows, else a list."""
        if self.span is not None:
            place, start, stop = self.span
            return arrays[place][start:stop]
        return [
            None if r is None else blocks[r[1]] if r[0] == _GIVEN else arrays[r[0]][r[1]]
            for r in self.refs
        ]


@dataclass(frozen=True, eq=False)
class _Horner:
    """outputs = coef x (tails + Horner sums of sources) (`gf256.gf_horner`)."""

    steps: np.ndarray
    sources: _Rows
    outputs: _Rows
    tails: _Rows | None
    coef: np.ndarray | None

    def run(self, blocks: dict[int, np.ndarray], arrays: tuple[np.ndarray, np.ndarray]) -> None:
        src = self.sources.get(blocks, arrays)
        tails = None if self.tails is None else self.tails.get(blocks, arrays)
        gf256.gf_horner(self.steps, src, self.outputs.get(blocks, arrays), tails, self.coef)


@dataclass(frozen=True, eq=False)
class _MatMul:
    """outputs = coef x sources (`gf256.gf_matmul`)."""

    coef: np.ndarray
    sources: _Rows
    outputs: _Rows

    def run(self, blocks: dict[int, np.ndarray], arrays: tuple[np.ndarray, np.ndarray]) -> None:
        src = self.sources.get(blocks, arrays)
        gf256.gf_matmul(self.coef, src, self.outputs.get(blocks, arrays))


@dataclass(frozen=True, eq=False)
class _Plan:
    """A decoding plan: copies of given blocks, then kernel steps, then copies of repeats."""

    copies: tuple[tuple[int, int], ...]  # (output row, given block)
    steps: tuple[_Horner | _MatMul, ...]
    repeats: tuple[tuple[int, int], ...]  # (output row, earlier output row of the same block)
    scratch: int  # rows of intermediate blocks

    def run(self, blocks: dict[int, np.ndarray], out: np.ndarray) -> None:
        scratch = np.empty((self.scratch, out.shape[1]), np.uint8) if self.scratch else out[:0]
        for row, idx in self.copies:
            out[row] = blocks[idx]
        for step in self.steps:
            step.run(blocks, (out, scratch))
        for row, earlier in self.repeats:
            out[row] = out[earlier]


class _Layout:
    """Builds a `_Plan`: places every block (given, a row of the result, or scratch)."""

    def __init__(self, present: Sequence[int], wanted: Sequence[int]) -> None:
        self.given = set(present)
        self.where: dict[int, _Ref] = {i: (_GIVEN, i) for i in present}
        self.copies: list[tuple[int, int]] = []
        self.repeats: list[tuple[int, int]] = []
        for row, idx in enumerate(wanted):
            if idx in self.given:
                self.copies.append((row, idx))
            elif idx in self.where:
                self.repeats.append((row, self.where[idx][1]))
            else:
                self.where[idx] = (_OUT, row)
        self.scratch = 0
        self.steps: list[_Horner | _MatMul] = []

    def rows(self, blocks: Sequence[int]) -> _Rows:
        refs: list[_Ref | None] = []
        for idx in blocks:
            if idx >= 0 and idx not in self.where:
                self.where[idx] = (_SCRATCH, self.scratch)
                self.scratch += 1
            refs.append(self.where[idx] if idx >= 0 else None)
        return _Rows.of(refs)

    def horner(
        self,
        steps: np.ndarray,
        sources: Sequence[int],
        outputs: Sequence[int],
        tails: Sequence[int] = (),
        coef: np.ndarray | None = None,
    ) -> None:
        tail_rows = self.rows(tails) if tails else None
        self.steps.append(_Horner(steps, self.rows(sources), self.rows(outputs), tail_rows, coef))

    def matmul(self, coef: np.ndarray, sources: Sequence[int], outputs: Sequence[int]) -> None:
        self.steps.append(_MatMul(coef, self.rows(sources), self.rows(outputs)))

    def plan(self) -> _Plan:
        return _Plan(tuple(self.copies), tuple(self.steps), tuple(self.repeats), self.scratch)


def _horner_form(parity: np.ndarray) -> tuple[np.ndarray, bool]:
    """Per parity row the Horner steps: 0, 1, 2 for the powers of 1, 2, 4 (-1: other rows), and
    whether Horner's rule takes the data blocks in reverse (md: g^i) or in index order (ZFS:
    g^(k-1-i)). A code needs one order: rows of powers the other way round are not Horner rows.
    """
    m, k = parity.shape
    steps = np.full(m, -1, dtype=np.int64)
    reverse = np.zeros(m, dtype=bool)
    for j in range(m):
        for s in range(3):
            powers = np.array([gf256.power(1 << s, i) for i in range(k)], dtype=np.uint8)
            if np.array_equal(parity[j], powers[::-1]):
                steps[j] = s
                break
            if np.array_equal(parity[j], powers):
                steps[j], reverse[j] = s, True
                break
    reversed_ = bool(reverse.any())
    steps[(steps > 0) & (reverse != reversed_)] = -1
    return steps, reversed_


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
