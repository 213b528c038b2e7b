"""raid.gf256 checked against `galois` as the independent reference implementation of GF(2^8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import galois
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from raid import gf256, gf256_kernels

GF = galois.GF(2**8, irreducible_poly=0x11D)
ALL = np.arange(256, dtype=np.uint8)
NONZERO = np.arange(1, 256, dtype=np.uint8)


def plain(x) -> np.ndarray:
    """A galois FieldArray (or anything array-like) as a plain uint8 numpy array."""
    return np.asarray(x).view(np.ndarray).astype(np.uint8)


def random_invertible(rng: np.random.Generator, n: int) -> np.ndarray:
    while True:
        m = rng.integers(0, 256, (n, n), dtype=np.uint8)
        if np.linalg.det(GF(m)) != 0:
            return m


def random_singular(rng: np.random.Generator, n: int) -> np.ndarray:
    """An n x n matrix of rank < n: a random row is a random GF combination of the others."""
    m = GF(rng.integers(0, 256, (n, n), dtype=np.uint8))
    target = int(rng.integers(0, n))
    others = [i for i in range(n) if i != target]
    coef = GF(rng.integers(0, 256, len(others), dtype=np.uint8))
    m[target] = coef @ m[others] if others else GF(0)
    out = plain(m)
    assert np.linalg.matrix_rank(GF(out)) < n
    return out


# --- field and tables ---------------------------------------------------------------------------


def test_field_parameters_match_galois():
    assert int(GF.irreducible_poly) == gf256.POLY == 0x11D
    assert GF.is_primitive_poly
    assert gf256.GENERATOR == int(GF.primitive_element) == 2


def test_exp_table_is_powers_of_generator():
    assert gf256.EXP.dtype == np.uint8
    expected = plain(GF(gf256.GENERATOR) ** np.arange(255))
    assert np.array_equal(gf256.EXP[:255], expected)
    # The table is doubled so that EXP[LOG[a] + LOG[b]] needs no reduction modulo 255.
    assert np.array_equal(gf256.EXP[255:510], expected)
    # Every non-zero element appears exactly once in one period.
    assert sorted(gf256.EXP[:255].tolist()) == list(range(1, 256))


def test_log_table_is_discrete_log():
    expected = np.log(GF(NONZERO))
    assert np.array_equal(gf256.LOG[1:], np.asarray(expected))
    assert np.array_equal(gf256.EXP[gf256.LOG[NONZERO]], NONZERO)


def test_mul_table_all_products():
    expected = plain(GF(ALL)[:, None] * GF(ALL)[None, :])
    assert gf256.MUL.shape == (256, 256)
    assert gf256.MUL.dtype == np.uint8
    assert np.array_equal(gf256.MUL, expected)


def test_inv_table_all_inverses():
    assert gf256.INV[0] == 0
    assert np.array_equal(gf256.INV[1:], plain(np.reciprocal(GF(NONZERO))))
    assert np.all(gf256.MUL[NONZERO, gf256.INV[NONZERO]] == 1)


def test_scalar_mul_and_inv_exhaustive():
    ref = plain(GF(ALL)[:, None] * GF(ALL)[None, :])
    for a in range(256):
        for b in range(0, 256, 7):
            assert gf256.mul(a, b) == ref[a, b]
    for a in range(1, 256):
        r = gf256.inv(a)
        assert isinstance(r, int)
        assert r == int(GF(a) ** -1)
        assert gf256.mul(a, r) == 1


def test_inv_of_zero_raises():
    with pytest.raises(ZeroDivisionError):
        gf256.inv(0)


@pytest.mark.parametrize(
    "n", [0, 1, 2, 3, 7, 8, 100, 254, 255, 256, 300, 509, 510, 511, 1000, 65537]
)
def test_power_all_bases(n):
    expected = plain(GF(ALL) ** n)
    got = np.array([gf256.power(a, n) for a in range(256)], dtype=np.uint8)
    assert np.array_equal(got, expected)


@settings(deadline=None, max_examples=100)
@given(a=st.integers(0, 255), n=st.integers(0, 10**6))
def test_power_random(a, n):
    assert gf256.power(a, n) == int(GF(a) ** n)


# --- small matrices -----------------------------------------------------------------------------


@settings(deadline=None, max_examples=30)
@given(data=st.data(), r=st.integers(1, 12), s=st.integers(1, 12), t=st.integers(1, 12))
def test_mat_mul_matches_galois(data, r, s, t):
    a = data.draw(hnp.arrays(np.uint8, (r, s)))
    b = data.draw(hnp.arrays(np.uint8, (s, t)))
    got = gf256.mat_mul(a, b)
    assert got.dtype == np.uint8
    assert got.shape == (r, t)
    assert np.array_equal(got, plain(GF(a) @ GF(b)))


def test_mat_mul_identity_and_lists():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(gf256.mat_mul(np.eye(5, dtype=np.uint8), a), a)
    assert np.array_equal(gf256.mat_mul(a, np.eye(7, dtype=np.uint8)), a)
    # Plain lists are accepted.
    assert gf256.mat_mul([[2]], [[0x80]]).tolist() == [[0x1D]]


@pytest.mark.parametrize("n", range(1, 13))
def test_mat_inv_matches_galois(n):
    rng = np.random.default_rng(1000 + n)
    for _ in range(4):
        m = random_invertible(rng, n)
        before = m.copy()
        got = gf256.mat_inv(m)
        assert np.array_equal(m, before), "mat_inv must not modify its argument"
        assert got.dtype == np.uint8
        assert np.array_equal(got, plain(np.linalg.inv(GF(m))))
        eye = np.eye(n, dtype=np.uint8)
        assert np.array_equal(gf256.mat_mul(m, got), eye)
        assert np.array_equal(gf256.mat_mul(got, m), eye)


def test_mat_inv_needs_row_swaps():
    # Zero on the diagonal: Gauss-Jordan must pivot.
    m = np.array([[0, 1, 0], [0, 0, 3], [5, 0, 0]], dtype=np.uint8)
    assert np.array_equal(gf256.mat_inv(m), plain(np.linalg.inv(GF(m))))
    perm = np.eye(6, dtype=np.uint8)[[5, 3, 0, 4, 1, 2]]
    assert np.array_equal(gf256.mat_inv(perm), perm.T)


def test_mat_inv_1x1_exhaustive():
    for a in range(1, 256):
        assert gf256.mat_inv(np.array([[a]], dtype=np.uint8)).tolist() == [[int(GF(a) ** -1)]]
    with pytest.raises(gf256.SingularMatrixError):
        gf256.mat_inv(np.array([[0]], dtype=np.uint8))


@settings(deadline=None, max_examples=30)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_mat_inv_random_invertible(n, seed):
    m = random_invertible(np.random.default_rng(seed), n)
    assert np.array_equal(gf256.mat_inv(m), plain(np.linalg.inv(GF(m))))


@pytest.mark.parametrize("n", range(2, 13))
def test_mat_inv_singular_raises(n):
    rng = np.random.default_rng(2000 + n)
    for _ in range(3):
        m = random_singular(rng, n)
        with pytest.raises(gf256.SingularMatrixError):
            gf256.mat_inv(m)
    with pytest.raises(gf256.SingularMatrixError):
        gf256.mat_inv(np.zeros((n, n), dtype=np.uint8))
    dup = rng.integers(0, 256, (n, n), dtype=np.uint8)
    dup[-1] = dup[0]
    with pytest.raises(gf256.SingularMatrixError):
        gf256.mat_inv(dup)


def test_singular_error_is_value_error():
    assert issubclass(gf256.SingularMatrixError, ValueError)


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (4,), (1, 2)])
def test_mat_inv_non_square_raises(shape):
    with pytest.raises(ValueError):
        gf256.mat_inv(np.ones(shape, dtype=np.uint8))


# --- bulk kernel --------------------------------------------------------------------------------

# Lengths in 8-byte words: the kernel works in blocks of 256 words, so these cover a partial first
# block, exactly one block, one block plus a tail, and several blocks plus a tail.
WORDS = [1, 2, 3, 255, 256, 257, 300, 511, 512, 513, 3 * 256 + 5]


@pytest.fixture(params=["portable", "gfni"])
def matmul_kernel(request, monkeypatch):
    """gf_matmul with the portable kernel, then with the GFNI one where the processor has it."""
    kernels = gf256_kernels.get_kernels()
    if request.param == "gfni":
        if kernels.matmul_affine is None:
            pytest.skip("this processor has no GFNI with AVX-512 (or DWFS_GF_PORTABLE is set)")
    else:
        monkeypatch.setattr(gf256_kernels, "_kernels", kernels._replace(matmul_affine=None))
    return request.param


def test_affine_matrices_multiply_as_the_gfni_instruction_reads_them():
    """Emulating vgf2p8affineqb (bit i of the result = parity of byte 7 - i of the matrix AND
    the input byte) with gf256.AFFINE[c] gives c * x for every c and x, as galois says."""
    rows = np.stack([(gf256.AFFINE >> np.uint64(8 * (7 - i))) & np.uint64(0xFF)
                     for i in range(8)], axis=1).astype(np.uint8)  # (256 constants, 8 rows)
    anded = rows[:, :, None] & ALL[None, None, :]  # (c, i, x)
    parity = np.unpackbits(anded[..., None], axis=-1).sum(axis=-1) & 1
    product = (parity.astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(
        axis=1).astype(np.uint8)
    assert np.array_equal(product, plain(GF(ALL)[:, None] * GF(ALL)[None, :]))


def reference_matmul(coef: np.ndarray, src: np.ndarray) -> np.ndarray:
    return plain(GF(coef) @ GF(src))


def test_gf_matmul_every_constant_times_every_byte(matmul_kernel):
    # Row c of the result is c * (0, 1, ..., 255): all 65536 products through the word kernel,
    # with every byte value next to every kind of neighbour inside a 64-bit word.
    coef = ALL.reshape(256, 1)
    src = ALL.reshape(1, 256)
    got = gf256.gf_matmul(coef, src)
    assert np.array_equal(got, gf256.MUL)
    assert np.array_equal(got, reference_matmul(coef, src))
    # And reversed/shuffled bytes so that word lanes see other values.
    perm = np.random.default_rng(3).permutation(256).astype(np.uint8)
    assert np.array_equal(gf256.gf_matmul(coef, perm.reshape(1, 256)), gf256.MUL[:, perm])


@pytest.mark.parametrize("words", WORDS)
def test_gf_matmul_lengths(words, matmul_kernel):
    rng = np.random.default_rng(words)
    coef = rng.integers(0, 256, (6, 20), dtype=np.uint8)
    src = rng.integers(0, 256, (20, 8 * words), dtype=np.uint8)
    got = gf256.gf_matmul(coef, src)
    assert got.shape == (6, 8 * words)
    assert got.dtype == np.uint8
    assert np.array_equal(got, reference_matmul(coef, src))


@settings(deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    r=st.integers(1, 6),
    n=st.integers(1, 20),
    words=st.sampled_from(WORDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_gf_matmul_random_shapes(data, r, n, words, seed, matmul_kernel):
    # Coefficients from hypothesis (it likes 0, 1, 0x80 and 0xff, all interesting for the
    # kernel's zero-column skip and highest-bit logic); bulk data from a seeded generator.
    coef = data.draw(hnp.arrays(np.uint8, (r, n)))
    src = np.random.default_rng(seed).integers(0, 256, (n, 8 * words), dtype=np.uint8)
    assert np.array_equal(gf256.gf_matmul(coef, src), reference_matmul(coef, src))


def test_gf_matmul_zero_columns_and_single_bits(matmul_kernel):
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, (8, 8 * 300), dtype=np.uint8)
    coef = np.zeros((3, 8), dtype=np.uint8)
    assert not gf256.gf_matmul(coef, src).any()
    coef = np.array(
        [
            [0, 1, 0, 0x80, 0, 0, 0, 0],
            [0, 0, 0, 0, 2, 0, 0, 0x40],
            [0xFF, 0, 0, 0, 0, 0, 0x10, 0],
        ],
        dtype=np.uint8,
    )
    assert np.array_equal(gf256.gf_matmul(coef, src), reference_matmul(coef, src))
    # A coefficient 1 is a plain copy; a row of ones is XOR.
    assert np.array_equal(gf256.gf_matmul(np.eye(8, dtype=np.uint8), src), src)
    xor = np.bitwise_xor.reduce(src, axis=0)
    assert np.array_equal(gf256.gf_matmul(np.ones((1, 8), dtype=np.uint8), src)[0], xor)


def test_gf_matmul_into_dst(matmul_kernel):
    rng = np.random.default_rng(5)
    coef = rng.integers(0, 256, (4, 9), dtype=np.uint8)
    src = rng.integers(0, 256, (9, 8 * 600), dtype=np.uint8)
    expected = reference_matmul(coef, src)
    dst = np.full((4, 8 * 600), 0xA5, dtype=np.uint8)  # stale contents must be overwritten
    out = gf256.gf_matmul(coef, src, dst)
    assert out is dst
    assert np.array_equal(dst, expected)
    # A row-strided view of a wider buffer as the destination; the rest is left alone.
    big = np.full((4, 8 * 700), 0x5A, dtype=np.uint8)
    view = big[:, 8 * 50 : 8 * 650]
    gf256.gf_matmul(coef, src, view)
    assert np.array_equal(big[:, 8 * 50 : 8 * 650], expected)
    assert np.all(big[:, : 8 * 50] == 0x5A)
    assert np.all(big[:, 8 * 650 :] == 0x5A)


def test_gf_matmul_non_contiguous_and_readonly_src(matmul_kernel):
    rng = np.random.default_rng(6)
    coef = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    big = rng.integers(0, 256, (10, 8 * 400), dtype=np.uint8)
    src = big[::2, 8 : 8 + 8 * 300]  # strided rows, offset columns
    assert not src.flags.c_contiguous
    assert np.array_equal(gf256.gf_matmul(coef, src), reference_matmul(coef, src))
    ro = np.ascontiguousarray(src)
    ro.flags.writeable = False
    assert np.array_equal(gf256.gf_matmul(coef, ro), reference_matmul(coef, ro))
    # Coefficients as a non-uint8 / non-contiguous array are converted.
    coef_t = np.asfortranarray(coef.astype(np.int64))
    assert np.array_equal(gf256.gf_matmul(coef_t, src), reference_matmul(coef, src))


def test_gf_matmul_does_not_modify_inputs(matmul_kernel):
    rng = np.random.default_rng(7)
    coef = rng.integers(0, 256, (2, 3), dtype=np.uint8)
    src = rng.integers(0, 256, (3, 8 * 260), dtype=np.uint8)
    c0, s0 = coef.copy(), src.copy()
    gf256.gf_matmul(coef, src)
    assert np.array_equal(coef, c0)
    assert np.array_equal(src, s0)


def test_gf_matmul_empty_length(matmul_kernel):
    out = gf256.gf_matmul(np.ones((2, 3), dtype=np.uint8), np.zeros((3, 0), dtype=np.uint8))
    assert out.shape == (2, 0)


@pytest.mark.parametrize("length", [1, 2, 7, 9, 15, 2047, 2049, 2055])
def test_gf_matmul_length_not_multiple_of_8(length):
    with pytest.raises(ValueError, match="multiple of 8"):
        gf256.gf_matmul(np.ones((1, 2), dtype=np.uint8), np.zeros((2, length), dtype=np.uint8))


@pytest.mark.parametrize(
    ("coef_shape", "src_shape"),
    [
        ((2, 3), (2, 8)),  # too few source rows
        ((2, 3), (4, 8)),  # too many source rows
        ((2, 3), (24,)),  # one-dimensional source
        ((2, 3), (3, 1, 8)),  # three-dimensional source
        ((3,), (3, 8)),  # one-dimensional coefficients
    ],
)
def test_gf_matmul_bad_shapes(coef_shape, src_shape, matmul_kernel):
    with pytest.raises(ValueError):
        gf256.gf_matmul(np.ones(coef_shape, dtype=np.uint8), np.zeros(src_shape, dtype=np.uint8))


@pytest.mark.parametrize(
    "dst",
    [
        np.zeros((1, 64), dtype=np.uint8),  # too few rows
        np.zeros((3, 8), dtype=np.uint8),  # too short
        np.zeros((3, 72), dtype=np.uint8),  # too long
        np.zeros((3, 8), dtype=np.uint64),  # right byte size, wrong dtype
    ],
)
def test_gf_matmul_bad_dst(dst, matmul_kernel):
    # The compiled kernel has no bounds checks: a wrong destination must be refused up front
    # rather than written out of bounds.
    with pytest.raises(ValueError):
        gf256.gf_matmul(np.ones((3, 3), dtype=np.uint8), np.zeros((3, 64), dtype=np.uint8), dst)


def test_gf_matmul_bad_src_dtype(matmul_kernel):
    with pytest.raises(ValueError):
        gf256.gf_matmul(np.ones((3, 3), dtype=np.uint8), np.zeros((3, 64), dtype=np.int64))


def test_import_does_not_load_numba():
    # numba takes a second or more to import: only the first bulk operation may load it.
    code = "import sys, raid.gf256, raid.codec; sys.exit('numba' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def unaligned_copy(block: np.ndarray) -> np.ndarray:
    """A read-only copy of a block that starts one byte past an 8-byte boundary."""
    buf = b"\0" + block.tobytes()
    view = np.frombuffer(buf, dtype=np.uint8, offset=1)
    assert view.ctypes.data % 8 and not view.flags.writeable
    return view


def test_gf_matmul_sequences_of_blocks(matmul_kernel):
    # Sources as separate arrays (read-only, unaligned, strided), results into separate rows.
    rng = np.random.default_rng(8)
    coef = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    src = rng.integers(0, 256, (5, 8 * 300), dtype=np.uint8)
    expected = reference_matmul(coef, src)
    wide = np.repeat(src[2:3], 2, axis=1)  # row 2 at every other byte of a wider row
    blocks = [
        np.frombuffer(src[0].tobytes(), dtype=np.uint8),
        unaligned_copy(src[1]),
        wide[0, ::2],
        src[3],
        src[4].copy(),
    ]
    assert np.array_equal(blocks[2], src[2]) and blocks[2].strides != (1,)
    assert np.array_equal(gf256.gf_matmul(coef, blocks), expected)
    dst_buf = np.zeros((3, 2 * 8 * 300), dtype=np.uint8)
    dst = [dst_buf[0, : 8 * 300], dst_buf[1, ::2], dst_buf[2, 1 : 1 + 8 * 300]]
    assert gf256.gf_matmul(coef, blocks, dst) is dst
    assert all(np.array_equal(d, e) for d, e in zip(dst, expected, strict=True))
    assert not dst_buf[1, 1::2].any()
    # A reversed view (negative row stride) and an unaligned 2-D source.
    assert np.array_equal(gf256.gf_matmul(coef, src[::-1]), reference_matmul(coef, src[::-1]))
    buf = np.zeros(src.size + 1, dtype=np.uint8)
    unaligned = buf[1:].reshape(src.shape)
    unaligned[...] = src
    assert np.array_equal(gf256.gf_matmul(coef, unaligned), expected)


def test_gf_matmul_bad_blocks(matmul_kernel):
    coef = np.ones((2, 2), dtype=np.uint8)
    good = np.zeros(64, dtype=np.uint8)
    for src in ([good, None], [good, np.zeros(72, np.uint8)], [good, good.view(np.int8)], [good]):
        with pytest.raises(ValueError):
            gf256.gf_matmul(coef, src)
    readonly = np.zeros((2, 64), dtype=np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gf256.gf_matmul(coef, [good, good], readonly)
    with pytest.raises(ValueError, match="read-only"):
        gf256.gf_matmul(coef, [good, good], [good, np.frombuffer(bytes(64), np.uint8)])


def reference_horner(steps, src, tails, coef, length: int) -> np.ndarray:
    """coef x (tails + sum_i g^(n-1-i) src[i]) with galois, g = 2^step per row."""
    n = len(src)
    blocks = GF(np.zeros((n, length), dtype=np.uint8))
    for i, s in enumerate(src):
        if s is not None:
            blocks[i] = GF(s)
    rows = []
    for j, step in enumerate(steps):
        g = GF(1 << step)
        powers = GF(np.array([int(g ** (n - 1 - i)) for i in range(n)], dtype=np.uint8))
        row = powers @ blocks if n else GF(np.zeros(length, np.uint8))
        if tails is not None and tails[j] is not None:
            row = row + GF(tails[j])
        rows.append(row)
    y = GF(np.stack([plain(r) for r in rows])) if rows else GF(np.zeros((0, length), np.uint8))
    return plain(y if coef is None else GF(coef) @ y)


@settings(deadline=None, max_examples=60)
@given(
    data=st.data(),
    rows=st.integers(1, 5),
    n=st.integers(0, 12),
    words=st.sampled_from(WORDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_gf_horner_matches_galois(data, rows, n, words, seed):
    rng = np.random.default_rng(seed)
    length = 8 * words
    steps = data.draw(st.lists(st.integers(0, 2), min_size=rows, max_size=rows))
    src = [
        None if rng.random() < 0.25 else rng.integers(0, 256, length, dtype=np.uint8)
        for _ in range(n)
    ]
    tails = None
    if data.draw(st.booleans()):
        tails = [
            None if rng.random() < 0.25 else rng.integers(0, 256, length, dtype=np.uint8)
            for _ in range(rows)
        ]
    coef = None
    if data.draw(st.booleans()):
        coef = data.draw(hnp.arrays(np.uint8, (data.draw(st.integers(1, 4)), rows)))
    if all(s is None for s in src) and not any(t is not None for t in tails or ()):
        src.append(rng.integers(0, 256, length, dtype=np.uint8))  # something gives the length
    got = gf256.gf_horner(steps, src, tails=tails, coef=coef)
    assert np.array_equal(got, reference_horner(steps, src, tails, coef, length))


def test_gf_horner_md_and_zfs_parity():
    # md Q is a Horner sum of the data from the last block down, ZFS Q and R from the first.
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, (7, 8 * 300), dtype=np.uint8)
    md = np.array([[1] * 7, [gf256.power(2, i) for i in range(7)]], dtype=np.uint8)
    assert np.array_equal(gf256.gf_horner([0, 1], data[::-1]), reference_matmul(md, data))
    zfs = np.array([[gf256.power(g, 6 - i) for i in range(7)] for g in (1, 2, 4)], np.uint8)
    assert np.array_equal(gf256.gf_horner([0, 1, 2], data), reference_matmul(zfs, data))
    out = np.full((3, 8 * 300), 0xA5, dtype=np.uint8)
    assert gf256.gf_horner([0, 1, 2], list(data), out) is out
    assert np.array_equal(out, reference_matmul(zfs, data))


@pytest.mark.parametrize("lost", [(0, 1), (2, 5), (0, 6), (3, 4)])
def test_gf_horner_solves_raid6_syndromes(lost):
    # Two lost data blocks of md raid6 from the P and Q syndromes, in one pass.
    rng = np.random.default_rng(10)
    k = 7
    data = rng.integers(0, 256, (k, 8 * 520), dtype=np.uint8)
    md = np.array([[1] * k, [gf256.power(2, i) for i in range(k)]], dtype=np.uint8)
    p, q = reference_matmul(md, data)
    src = [None if i in lost else data[i] for i in range(k)][::-1]
    inverse = gf256.mat_inv(md[:, list(lost)])
    got = gf256.gf_horner([0, 1], src, tails=[p, q], coef=inverse)
    assert np.array_equal(got, data[list(lost)])


def test_gf_horner_bad_arguments():
    src = np.zeros((3, 64), dtype=np.uint8)
    for steps in ([3], [-1], [0, 1, 4]):
        with pytest.raises(ValueError, match="steps"):
            gf256.gf_horner(steps, src)
    with pytest.raises(ValueError, match="coefficients"):
        gf256.gf_horner([0, 1], src, coef=np.ones((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiple of 8"):
        gf256.gf_horner([0], np.zeros((3, 12), dtype=np.uint8))
    with pytest.raises(ValueError):
        gf256.gf_horner([0], src, tails=[np.zeros(8, dtype=np.uint8)])
    with pytest.raises(ValueError):
        gf256.gf_horner([0, 1], src, np.zeros((1, 64), dtype=np.uint8))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
def test_gf_horner_solve_every_row_kind(rows):
    # Rows of 0s and 1s, rows one bit-0 flip away from an earlier row (computed from it), dense
    # rows, zero rows; more than three sums take the general path.
    rng = np.random.default_rng(20 + rows)
    length = 8 * 513
    src = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(6)]
    tails = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(rows)]
    steps = [j % 3 for j in range(rows)]
    dense = rng.integers(2, 256, rows, dtype=np.uint8)
    coef = np.stack(
        [
            dense,
            dense ^ np.eye(rows, dtype=np.uint8)[0],
            rng.integers(0, 2, rows, dtype=np.uint8),
            np.zeros(rows, dtype=np.uint8),
            np.ones(rows, dtype=np.uint8),
            rng.integers(0, 256, rows, dtype=np.uint8),
        ]
    )
    got = gf256.gf_horner(steps, src, tails=tails, coef=coef)
    assert np.array_equal(got, reference_horner(steps, src, tails, coef, length))
