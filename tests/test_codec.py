"""raid.codec: on-disk compatibility with Linux md raid6 and ZFS raidz, Reed-Solomon MDS, decoding.

The md and raidz parity references below are written from the kernels' algorithms with plain
byte operations (no raid.gf256); `galois` is the reference for everything else.
"""

from __future__ import annotations

import itertools
import math
import random

import galois
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raid import gf256, levels
from raid.codec import (
    MAX_PARITY,
    Codec,
    TooManyErasuresError,
    cauchy_matrix,
    md_pq_matrix,
    mirror_matrix,
    zfs_matrix,
)

GF = galois.GF(2**8, irreducible_poly=0x11D)


def plain(x) -> np.ndarray:
    return np.asarray(x).view(np.ndarray).astype(np.uint8)


def random_data(k: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (k, length), dtype=np.uint8)


# --- independent references for the on-disk formats ---------------------------------------------


def xtime(x: np.ndarray) -> np.ndarray:
    """Byte-wise multiplication by 2 modulo x^8+x^4+x^3+x^2+1 (Linux SHLBYTE/MASK, ZFS MUL2)."""
    x = np.asarray(x, dtype=np.uint8)
    shifted = (x.astype(np.uint16) << 1) & 0xFF
    carry = np.where(x & 0x80, 0x1D, 0)
    return (shifted ^ carry).astype(np.uint8)


def linux_raid6_gen_syndrome(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P and Q as lib/raid6/int.uc computes them (data disks 0..k-1, Horner from the top)."""
    z0 = data.shape[0] - 1  # z0 = disks - 3: the highest data disk
    wp = data[z0].copy()
    wq = data[z0].copy()
    for z in range(z0 - 1, -1, -1):
        wd = data[z]
        wp ^= wd
        wq = xtime(wq) ^ wd
    return wp, wq


def zfs_generate_parity_pqr(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, Q, R as vdev_raidz_generate_parity_pqr does: columns in order, MUL2 / MUL4 Horner."""
    p = data[0].copy()
    q = data[0].copy()
    r = data[0].copy()
    for c in range(1, data.shape[0]):
        src = data[c]
        p ^= src
        q = xtime(q) ^ src
        r = xtime(xtime(r)) ^ src
    return p, q, r


def test_xtime_reference():
    # The reference itself, on values whose doubling is known by hand, and against galois.
    assert xtime(np.array([0x01, 0x02, 0x40, 0x80, 0x81, 0xFF], np.uint8)).tolist() == [
        0x02,
        0x04,
        0x80,
        0x1D,
        0x1F,
        0xE3,
    ]
    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(xtime(every), plain(GF(2) * GF(every)))


# --- Linux md raid6 -----------------------------------------------------------------------------


def blocks_of(*values: int, length: int = 16) -> np.ndarray:
    return np.array([[v] * length for v in values], dtype=np.uint8)


def test_md_known_vectors():
    codec = Codec(md_pq_matrix(2, 2))
    p, q = codec.encode(blocks_of(0x01, 0x01))
    assert np.all(p == 0x00)
    assert np.all(q == 0x03)
    p, q = codec.encode(blocks_of(0x00, 0x80))
    assert np.all(p == 0x80)
    assert np.all(q == 0x1D)
    # A single 1 on data disk z gives Q = 2^z: 1, 2, 4, ..., 0x80, then 0x1d (reduction).
    for z, expected in enumerate([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1D, 0x3A]):
        data = np.zeros((10, 8), dtype=np.uint8)
        data[z] = 1
        p, q = Codec(md_pq_matrix(10, 2)).encode(data)
        assert np.all(p == 1)
        assert np.all(q == expected), z


def test_md_matrix_rows():
    m = md_pq_matrix(5, 2)
    assert m.dtype == np.uint8
    assert m.tolist() == [[1, 1, 1, 1, 1], [1, 2, 4, 8, 16]]
    assert md_pq_matrix(5, 1).tolist() == [[1, 1, 1, 1, 1]]
    for bad in (0, 3, 4):
        with pytest.raises(ValueError):
            md_pq_matrix(5, bad)


@pytest.mark.parametrize("k", [*range(2, 21), 64, 128, 253, 254])
def test_md_raid6_encode_matches_linux(k):
    data = random_data(k, 8 * 40, seed=k)
    p, q = linux_raid6_gen_syndrome(data)
    parity = Codec(md_pq_matrix(k, 2)).encode(data)
    assert parity.shape == (2, 8 * 40)
    assert np.array_equal(parity[0], p)
    assert np.array_equal(parity[1], q)
    # raid5 (md with one parity row) is P alone.
    assert np.array_equal(Codec(md_pq_matrix(k, 1)).encode(data), p[None, :])


@settings(deadline=None, max_examples=30)
@given(k=st.integers(2, 20), words=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_md_raid6_encode_matches_linux_random(k, words, seed):
    data = random_data(k, 8 * words, seed)
    p, q = linux_raid6_gen_syndrome(data)
    parity = Codec(md_pq_matrix(k, 2)).encode(data)
    assert np.array_equal(parity[0], p)
    assert np.array_equal(parity[1], q)


def test_raid6_level_uses_md_layout():
    for members in range(4, 12):
        k = members - 2
        assert np.array_equal(levels.parity_matrix("raid6", members), md_pq_matrix(k, 2))
        data = random_data(k, 64, seed=members)
        p, q = linux_raid6_gen_syndrome(data)
        parity = Codec(levels.parity_matrix("raid6", members)).encode(data)
        assert np.array_equal(parity, np.stack([p, q]))


# --- ZFS raidz ----------------------------------------------------------------------------------


def test_zfs_known_vectors():
    # First column carries the highest power: D0 = 1, D1 = 0 -> Q = 2, R = 4.
    p, q, r = Codec(zfs_matrix(2, 3)).encode(blocks_of(0x01, 0x00))
    assert np.all(p == 1) and np.all(q == 2) and np.all(r == 4)
    p, q, r = Codec(zfs_matrix(2, 3)).encode(blocks_of(0x00, 0x01))
    assert np.all(p == 1) and np.all(q == 1) and np.all(r == 1)
    # D0 = 0x80 with k = 3: Q = 4 * 0x80 = 2^9 = 0x3a, R = 16 * 0x80 = 2^11 = 0xe8.
    p, q, r = Codec(zfs_matrix(3, 3)).encode(blocks_of(0x80, 0x00, 0x00))
    assert np.all(p == 0x80)
    assert np.all(q == 0x3A)
    assert np.all(r == 0xE8)


def test_zfs_matrix_rows():
    m = zfs_matrix(4, 3)
    assert m.tolist() == [[1, 1, 1, 1], [8, 4, 2, 1], [64, 16, 4, 1]]
    assert zfs_matrix(4, 1).tolist() == [[1, 1, 1, 1]]
    assert zfs_matrix(4, 2).tolist() == m[:2].tolist()
    for bad in (0, 4, 6):
        with pytest.raises(ValueError):
            zfs_matrix(4, bad)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 32, 100, 252])
def test_zfs_encode_matches_raidz(k, m):
    data = random_data(k, 8 * 37, seed=100 * k + m)
    expected = np.stack(zfs_generate_parity_pqr(data)[:m])
    assert np.array_equal(Codec(zfs_matrix(k, m)).encode(data), expected)


@settings(deadline=None, max_examples=30)
@given(
    k=st.integers(1, 40),
    m=st.integers(1, 3),
    words=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_zfs_encode_matches_raidz_random(k, m, words, seed):
    data = random_data(k, 8 * words, seed)
    expected = np.stack(zfs_generate_parity_pqr(data)[:m])
    assert np.array_equal(Codec(zfs_matrix(k, m)).encode(data), expected)


def test_raidz_levels_use_zfs_layout():
    for level, m in (("raidz1", 1), ("raidz2", 2), ("raidz3", 3)):
        for members in range(m + 1, m + 9):
            k = members - m
            pm = levels.parity_matrix(level, members)
            assert np.array_equal(pm, zfs_matrix(k, m))
            data = random_data(k, 64, seed=members)
            expected = np.stack(zfs_generate_parity_pqr(data)[:m])
            assert np.array_equal(Codec(pm).encode(data), expected)


# --- Reed-Solomon (Cauchy) ----------------------------------------------------------------------


def generator(parity: np.ndarray) -> np.ndarray:
    k = parity.shape[1]
    return np.concatenate([np.eye(k, dtype=np.uint8), parity])


def assert_invertible(sub: np.ndarray) -> None:
    k = sub.shape[0]
    inverse = gf256.mat_inv(sub)  # raises SingularMatrixError if not
    assert np.array_equal(gf256.mat_mul(sub, inverse), np.eye(k, dtype=np.uint8))


@pytest.mark.parametrize("m", range(1, MAX_PARITY + 1))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 17, 64, 250])
def test_cauchy_matrix_shape_and_first_row(k, m):
    c = cauchy_matrix(k, m)
    assert c.shape == (m, k)
    assert c.dtype == np.uint8
    assert np.all(c[0] == 1), "P must stay a plain XOR"
    assert np.all(c != 0)
    # Rows are distinct and so are columns (a necessary MDS condition for m >= 2).
    if m >= 2:
        assert len({tuple(col) for col in c.T}) == k
        assert len({tuple(row) for row in c}) == m


def test_cauchy_single_parity_is_xor():
    assert np.array_equal(cauchy_matrix(7, 1), np.ones((1, 7), dtype=np.uint8))


def test_cauchy_size_limit():
    assert cauchy_matrix(250, 6).shape == (6, 250)
    assert cauchy_matrix(255, 1).shape == (1, 255)
    with pytest.raises(ValueError):
        cauchy_matrix(251, 6)
    with pytest.raises(ValueError):
        cauchy_matrix(256, 1)


@settings(deadline=None, max_examples=25)
@given(
    k=st.integers(1, 40),
    m=st.integers(1, MAX_PARITY),
    words=st.sampled_from([1, 2, 256, 257, 300]),
    seed=st.integers(0, 2**32 - 1),
)
def test_cauchy_encode_matches_galois(k, m, words, seed):
    data = random_data(k, 8 * words, seed)
    c = cauchy_matrix(k, m)
    assert np.array_equal(Codec(c).encode(data), plain(GF(c) @ GF(data)))


def small_code_shapes():
    return [(k, m) for k in range(1, 7) for m in range(1, 5)]


@pytest.mark.parametrize(("k", "m"), small_code_shapes())
def test_cauchy_mds_exhaustive(k, m):
    gen = generator(cauchy_matrix(k, m))
    n = k + m
    count = 0
    for rows in itertools.combinations(range(n), k):
        assert_invertible(gen[list(rows)])
        count += 1
    assert count == len(list(itertools.combinations(range(n), k)))
    # Cross-check a few with galois, independently of gf256.mat_inv.
    rng = random.Random(k * 10 + m)
    for rows in rng.sample(list(itertools.combinations(range(n), k)), min(count, 5)):
        assert np.linalg.matrix_rank(GF(gen[list(rows)])) == k


@pytest.mark.parametrize("m", [5, 6])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_cauchy_mds_exhaustive_wide(k, m):
    gen = generator(cauchy_matrix(k, m))
    for rows in itertools.combinations(range(k + m), k):
        assert_invertible(gen[list(rows)])


@pytest.mark.parametrize(
    ("k", "m", "samples"), [(10, 6, 150), (20, 5, 150), (32, 6, 150), (100, 6, 300), (250, 6, 300)]
)
def test_cauchy_mds_sampled(k, m, samples):
    pm = cauchy_matrix(k, m)
    gen = generator(pm)
    rng = random.Random(k * 100 + m)
    n = k + m
    for i in range(samples):
        # Bias towards the hard cases: lose as many data rows as possible.
        lost = rng.sample(range(k), m) if i % 2 else rng.sample(range(n), m)
        assert_minor_invertible(pm, lost)
        if k <= 32 and i < 40:
            assert_invertible(gen[[r for r in range(n) if r not in lost]])
    rows = list(range(n - k, n))  # the first m blocks lost: as many data blocks as possible
    assert np.linalg.matrix_rank(GF(gen[rows])) == k


@pytest.mark.parametrize("m", range(1, MAX_PARITY + 1))
def test_cauchy_square_minors_nonsingular(m):
    # The Cauchy property itself: every square submatrix of the parity rows is invertible.
    k = 7
    c = cauchy_matrix(k, m)
    for size in range(1, m + 1):
        for rows in itertools.combinations(range(m), size):
            for cols in itertools.combinations(range(k), size):
                assert_invertible(c[np.ix_(rows, cols)])


# --- mirror and striping ------------------------------------------------------------------------


@pytest.mark.parametrize("copies", range(2, 9))
def test_mirror_encode_copies_data(copies):
    pm = mirror_matrix(copies)
    assert pm.shape == (copies - 1, 1)
    codec = Codec(pm)
    data = random_data(1, 8 * 300, seed=copies)
    parity = codec.encode(data)
    assert parity.shape == (copies - 1, 8 * 300)
    assert all(np.array_equal(row, data[0]) for row in parity)
    out = np.zeros_like(parity)
    assert codec.encode(data, out) is out
    assert np.array_equal(out, parity)


def test_stripe_encode_is_empty():
    codec = Codec(np.zeros((0, 4), dtype=np.uint8))
    assert (codec.k, codec.m, codec.n) == (4, 0, 4)
    assert codec.encode(random_data(4, 64, seed=1)).shape == (0, 64)


def test_codec_generator_and_out_parameter():
    pm = cauchy_matrix(5, 3)
    codec = Codec(pm)
    assert (codec.k, codec.m, codec.n) == (5, 3, 8)
    assert np.array_equal(codec.generator[:5], np.eye(5, dtype=np.uint8))
    assert np.array_equal(codec.generator[5:], pm)
    data = random_data(5, 8 * 10, seed=2)
    out = np.full((3, 80), 0xEE, dtype=np.uint8)
    assert codec.encode(data, out) is out
    assert np.array_equal(out, plain(GF(pm) @ GF(data)))


# --- decoding -----------------------------------------------------------------------------------


def encoded(codec: Codec, length: int, seed: int) -> np.ndarray:
    data = random_data(codec.k, length, seed)
    return np.concatenate([data, codec.encode(data)])


def check_recovers(codec: Codec, full: np.ndarray, lost) -> None:
    lost = list(lost)
    blocks = {i: full[i].copy() for i in range(codec.n) if i not in lost}
    snapshot = {i: b.copy() for i, b in blocks.items()}
    got = codec.reconstruct(blocks, lost)
    assert got.shape == (len(lost), full.shape[1])
    assert np.array_equal(got, full[lost]), f"lost {lost}"
    assert all(np.array_equal(blocks[i], snapshot[i]) for i in blocks), "inputs modified"


def check_too_many(codec: Codec, full: np.ndarray, lost) -> None:
    blocks = {i: full[i] for i in range(codec.n) if i not in lost}
    with pytest.raises(TooManyErasuresError):
        codec.reconstruct(blocks, list(lost))


def patterns(n: int, count: int):
    return itertools.combinations(range(n), count)


def sampled_patterns(n: int, count: int, limit: int, seed: int):
    """All `count`-subsets of range(n) if there are at most `limit`, else `limit` random ones."""
    if math.comb(n, count) <= limit:
        return list(patterns(n, count))
    rng = random.Random(seed)
    return [tuple(sorted(rng.sample(range(n), count))) for _ in range(limit)]


def check_code(codec: Codec, seed: int, exhaustive_limit: int = 200, length: int = 8 * 5):
    full = encoded(codec, length, seed)
    for count in range(0, codec.m + 1):
        for lost in sampled_patterns(codec.n, count, exhaustive_limit, seed + count):
            check_recovers(codec, full, lost)
    if codec.m + 1 <= codec.n:
        for lost in sampled_patterns(codec.n, codec.m + 1, 30, seed):
            check_too_many(codec, full, lost)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k", range(1, 11))
def test_md_decode_every_pattern(k, m):
    check_code(Codec(md_pq_matrix(k, m)), seed=k * 7 + m)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("k", range(1, 13))
def test_zfs_decode_every_pattern(k, m):
    check_code(Codec(zfs_matrix(k, m)), seed=k * 11 + m)


@pytest.mark.parametrize(("k", "m"), [*small_code_shapes(), (6, 5), (6, 6)])
def test_cauchy_decode_every_pattern(k, m):
    check_code(Codec(cauchy_matrix(k, m)), seed=k * 13 + m)


@pytest.mark.parametrize(
    ("k", "m", "limit"), [(10, 6, 12), (20, 5, 12), (30, 6, 12), (64, 4, 4), (200, 6, 1)]
)
def test_cauchy_decode_sampled(k, m, limit):
    check_code(Codec(cauchy_matrix(k, m)), seed=k * 17 + m, exhaustive_limit=limit)


@pytest.mark.parametrize("copies", range(2, 8))
def test_mirror_decode_every_pattern(copies):
    codec = Codec(mirror_matrix(copies))
    check_code(codec, seed=copies)
    with pytest.raises(TooManyErasuresError):
        codec.reconstruct({}, [0])


def test_zfs_raidz3_is_mds_up_to_16_data_columns():
    """Every 3-erasure pattern of the {1, 2, 4} raidz3 code decodes, for k = 1..16."""
    failures: list[tuple[int, tuple[int, ...], str]] = []
    for k in range(1, 17):
        codec = Codec(zfs_matrix(k, 3))
        full = encoded(codec, 8 * 2, seed=k)
        for lost in patterns(k + 3, 3):
            blocks = {i: full[i] for i in range(k + 3) if i not in lost}
            try:
                got = codec.reconstruct(blocks, list(lost))
            except gf256.SingularMatrixError as exc:
                failures.append((k, lost, f"singular: {exc}"))
                continue
            if not np.array_equal(got, full[list(lost)]):
                failures.append((k, lost, "wrong data"))
    assert not failures, f"{len(failures)} raidz3 patterns fail, first: {failures[:5]}"


def assert_minor_invertible(parity: np.ndarray, lost) -> None:
    """The square system left when exactly m blocks are lost: surviving parity rows x lost data
    columns. The code is MDS iff this is invertible for every choice of m lost blocks."""
    k, m = parity.shape[1], parity.shape[0]
    assert len(lost) == m
    lost_data = [i for i in lost if i < k]
    surviving_parity = [j for j in range(m) if k + j not in lost]
    assert len(lost_data) == len(surviving_parity)
    if lost_data:
        assert_invertible(parity[np.ix_(surviving_parity, lost_data)])


@pytest.mark.parametrize("k", [17, 32, 64, 128, 200, 252])
def test_zfs_raidz3_mds_sampled_large(k):
    pm = zfs_matrix(k, 3)
    rng = random.Random(k)
    for i in range(300):
        # Mostly three lost data columns, the case where all three parity rows must be solved.
        lost = rng.sample(range(k), 3) if i % 4 else rng.sample(range(k + 3), 3)
        assert_minor_invertible(pm, lost)
    # The first and the last data columns and one in the middle, decoded for real.
    codec = Codec(pm)
    check_recovers(codec, encoded(codec, 16, seed=k), [0, k // 2, k - 1])


@pytest.mark.parametrize("k", [40, 85, 170, 252])
def test_zfs_raidz3_mds_structured_large(k):
    # Columns whose exponents differ by multiples of 85 or 51 (divisors of 255) are where a
    # generator of lower order would collide; 2 and 4 both have order 255, so these must decode.
    pm = zfs_matrix(k, 3)
    for step in (1, 3, 5, 15, 17, 51, 85):
        for start in range(0, k - 2 * step):
            assert_minor_invertible(pm, [start, start + step, start + 2 * step])


def test_reconstruct_wanted_order_and_present_blocks():
    codec = Codec(cauchy_matrix(6, 3))
    full = encoded(codec, 8 * 20, seed=5)
    blocks = {i: full[i] for i in range(9) if i not in (1, 4, 7)}
    wanted = [7, 0, 4, 1, 8]  # lost and present, parity and data, in no particular order
    assert np.array_equal(codec.reconstruct(blocks, wanted), full[wanted])
    assert np.array_equal(codec.reconstruct(blocks, list(range(9))), full)
    assert codec.reconstruct(blocks, []).shape == (0, 8 * 20)


def test_reconstruct_prefers_data_blocks():
    # With more than k blocks given, data blocks are used first: a bad block beyond the first k
    # (in index order) does not affect the result.
    codec = Codec(md_pq_matrix(4, 2))
    full = encoded(codec, 64, seed=9)
    blocks = {i: full[i].copy() for i in range(6) if i != 2}
    blocks[5] ^= 0xFF  # Q corrupt but not needed: sources are 0, 1, 3, 4 (P)
    assert np.array_equal(codec.reconstruct(blocks, [2])[0], full[2])


def test_reconstruct_too_few_blocks_message():
    codec = Codec(zfs_matrix(5, 2))
    full = encoded(codec, 64, seed=3)
    blocks = {i: full[i] for i in (0, 1, 2, 6)}
    with pytest.raises(TooManyErasuresError, match="3 of 7 blocks lost; this code recovers 2"):
        codec.reconstruct(blocks, [3])
    assert issubclass(TooManyErasuresError, ValueError)


def test_recovery_matrix_needs_exactly_k_sources():
    codec = Codec(md_pq_matrix(4, 2))
    with pytest.raises(TooManyErasuresError):
        codec.recovery_matrix([0, 1, 2], [3])
    with pytest.raises(TooManyErasuresError):
        codec.recovery_matrix([0, 1, 2, 3, 4], [5])
    coef = codec.recovery_matrix([0, 1, 4, 5], [2, 3])
    # Independently: the solution of the 4 x 4 system of surviving rows, via galois.
    gen = GF(codec.generator)
    expected = gen[[2, 3]] @ np.linalg.inv(gen[[0, 1, 4, 5]])
    assert np.array_equal(coef, plain(expected))


CODE_KINDS = ["md", "zfs", "cauchy", "mirror"]


@st.composite
def code_and_erasures(draw, extra: int = 0):
    kind = draw(st.sampled_from(CODE_KINDS))
    if kind == "md":
        k, m = draw(st.integers(1, 30)), draw(st.integers(1, 2))
        pm = md_pq_matrix(k, m)
    elif kind == "zfs":
        k, m = draw(st.integers(1, 30)), draw(st.integers(1, 3))
        pm = zfs_matrix(k, m)
    elif kind == "cauchy":
        k, m = draw(st.integers(1, 30)), draw(st.integers(1, MAX_PARITY))
        pm = cauchy_matrix(k, m)
    else:
        copies = draw(st.integers(2, 8))
        k, m = 1, copies - 1
        pm = mirror_matrix(copies)
    n = k + m
    count = min(m + extra, n)
    lost = draw(st.lists(st.integers(0, n - 1), min_size=count, max_size=count, unique=True))
    lost = lost if extra else lost[: draw(st.integers(0, count))]
    return pm, lost


@settings(deadline=None, max_examples=60)
@given(case=code_and_erasures(), words=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_decode_random(case, words, seed):
    pm, lost = case
    codec = Codec(pm)
    check_recovers(codec, encoded(codec, 8 * words, seed), lost)


@settings(deadline=None, max_examples=30)
@given(case=code_and_erasures(extra=1), seed=st.integers(0, 2**32 - 1))
def test_decode_one_too_many_random(case, seed):
    pm, lost = case
    codec = Codec(pm)
    assert len(lost) == codec.m + 1
    check_too_many(codec, encoded(codec, 16, seed), lost)


def level_cases():
    cases = []
    for name, spec in levels.LEVELS.items():
        for members in range(spec.min_members, spec.min_members + 5):
            try:
                spec.check(members)
            except levels.LevelError:
                continue
            cases.append((name, members))
    return cases


@pytest.mark.parametrize(("level", "members"), level_cases())
def test_level_parity_matrices_decode_within_tolerance(level, members):
    shape = levels.shape_of(level, members)
    pm = levels.parity_matrix(level, members)
    assert pm.shape == (shape.m, shape.k)
    codec = Codec(pm)
    assert codec.m == levels.tolerance(level, members)
    check_code(codec, seed=members)


@pytest.mark.parametrize(
    "pm",
    [md_pq_matrix(5, 2), zfs_matrix(4, 3), cauchy_matrix(4, 3), mirror_matrix(3)],
    ids=["md", "zfs", "cauchy", "mirror"],
)
def test_reconstruct_any_wanted_subset(pm):
    # Every erasure pattern within tolerance and every choice of wanted blocks among the lost
    # ones (lost data blocks not wanted must still be solved for), plus a present block and a
    # repeat; and lost parity wanted beside lost data.
    codec = Codec(pm)
    full = encoded(codec, 8 * 70, seed=codec.n)
    for count in range(1, codec.m + 1):
        for lost in patterns(codec.n, count):
            blocks = {i: full[i] for i in range(codec.n) if i not in lost}
            present = next(iter(blocks))
            for size in range(1, count + 1):
                for wanted in itertools.combinations(lost, size):
                    want = [wanted[-1], present, *wanted, wanted[0]]
                    assert np.array_equal(codec.reconstruct(blocks, want), full[want]), want


def test_reconstruct_readonly_unaligned_blocks():
    # Blocks as read from members: read-only arrays over bytes, some not 8-byte aligned.
    for pm in (md_pq_matrix(6, 2), zfs_matrix(5, 3), cauchy_matrix(6, 3)):
        codec = Codec(pm)
        full = encoded(codec, 8 * 300, seed=pm.shape[1])
        lost = [0, 3, codec.n - 1][: codec.m]
        blocks = {}
        for i in range(codec.n):
            if i in lost:
                continue
            offset = i % 2
            buf = bytes(offset) + full[i].tobytes()
            blocks[i] = np.frombuffer(buf, dtype=np.uint8, offset=offset)
        assert np.array_equal(codec.reconstruct(blocks, lost), full[lost])
        data = np.frombuffer(full[: codec.k].tobytes(), dtype=np.uint8).reshape(codec.k, -1)
        assert np.array_equal(codec.encode(data), full[codec.k :])


def power_rows(k: int, rng: random.Random) -> list[list[int]]:
    """Rows of powers of small elements, in either column order, and rows of random constants."""
    rows = []
    for _ in range(rng.randint(1, 4)):
        g = rng.choice([1, 2, 3, 4, 8])
        row = [gf256.power(g, i) for i in range(k)]
        kind = rng.random()
        if kind < 0.4:
            row = row[::-1]
        elif kind > 0.85:
            row = [rng.randint(0, 255) for _ in range(k)]
        rows.append(row)
    return rows


@settings(deadline=None, max_examples=40)
@given(k=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_other_power_codes(k, seed):
    # Codes mixing Horner rows (either order) with other rows: encoding matches galois and every
    # pattern the code can solve decodes.
    rng = random.Random(seed)
    pm = np.array(power_rows(k, rng), dtype=np.uint8)
    codec = Codec(pm)
    data = random_data(k, 8 * 33, seed)
    parity = codec.encode(data)
    assert np.array_equal(parity, plain(GF(pm) @ GF(data)))
    full = np.concatenate([data, parity])
    for count in range(1, codec.m + 1):
        for lost in sampled_patterns(codec.n, count, 40, seed):
            blocks = {i: full[i] for i in range(codec.n) if i not in lost}
            try:
                got = codec.reconstruct(blocks, list(lost))
            except gf256.SingularMatrixError:
                continue  # not MDS: this pattern cannot be solved
            assert np.array_equal(got, full[list(lost)]), (pm.tolist(), lost)
