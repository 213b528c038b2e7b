"""The compiled bulk kernels of raid.gf256 (numba, cached on disk, compiled on first use).

Only raid.gf256 uses this module; it checks and prepares every argument. Importing this module
does not import numba.
"""

from __future__ import annotations

import os
import threading
from typing import Any, NamedTuple

import numpy as np

# The kernels work on 64-bit words and take blocks as arrays of addresses (0 = a zero block), so
# that callers pass separate arrays (a dict of surviving blocks, rows of a buffer) without first
# copying them into one array; the Python wrappers check every block and keep it alive. Each
# kernel accumulates a few KiB at a time in arrays of its own and then copies them out: LLVM
# vectorises loops over such private arrays, not over ones that may alias the caller's blocks.

_BLOCK_WORDS = 512
"""Words (8 bytes) per row that the kernels work on at a time."""

_HI = np.uint64(0x8080808080808080)
_LO = np.uint64(0xFEFEFEFEFEFEFEFE)
_POLY = np.uint64(0x1D1D1D1D1D1D1D1D)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_SEVEN = np.uint64(7)

# numba helpers the kernels call, created by _compile_kernels. They are module globals rather than
# closure variables because numba's on-disk cache cannot key functions that close over them.
_words_at: Any = None
_double: Any = None
_row_tops: Any = None
_matmul_block: Any = None
_solve_plan: Any = None
_affine_set: Any = None
_affine_xor: Any = None


class Kernels(NamedTuple):
    """The compiled bulk kernels."""

    matmul: Any
    horner: Any
    address: Any
    row_addresses: Any
    # dsts[o] = sum_i mats[o, i] applied to srcs[i], 64 bytes at a time with the x86 GFNI
    # instruction (vgf2p8affineqb, AVX-512); None where the processor lacks it
    matmul_affine: Any = None


AFFINE_ENV = "DWFS_GF_PORTABLE"
"""Set (to anything but 0 or empty) to leave the GFNI kernel out and use the portable one."""


def gfni_usable() -> bool:
    """True if this processor has GFNI with AVX-512 (BW) and the environment does not ask for
    the portable kernel."""
    if os.environ.get(AFFINE_ENV, "0") not in ("", "0"):
        return False
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return all(features.get(f, False) for f in ("gfni", "avx512f", "avx512bw"))


_kernels: Kernels | None = None
_compile_lock = threading.Lock()


def _compile_kernels() -> Kernels:  # pragma: no cover - exercised through gf_matmul/gf_horner
    global _words_at, _double, _row_tops, _matmul_block, _solve_plan
    from numba import carray, njit, types
    from numba.extending import intrinsic

    @intrinsic
    def words_at(typingctx, address):
        """The uint64 pointer at an integer address."""
        sig = types.CPointer(types.uint64)(types.intp)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    @njit(inline="always")
    def double(x):
        """Eight bytes times 2: shift, and XOR 0x1d where the top bit was set (no multiply)."""
        m = x & _HI
        return ((x << _ONE) & _LO) ^ (((m << _ONE) - (m >> _SEVEN)) & _POLY)

    @njit(inline="always")
    def row_tops(coef):
        """The highest bit set in each row of coef (-1: a zero row)."""
        rows, n = coef.shape
        tops = np.empty(rows, np.int64)
        for o in range(rows):
            bits = 0
            for i in range(n):
                bits |= coef[o, i]
            tops[o] = -1
            for b in range(8):
                if (bits >> b) & 1:
                    tops[o] = b
        return tops

    @njit(inline="always")
    def matmul_block(coef, tops, srcs, src_offset, dsts, dst_offset, width, acc, picked):
        """dsts[o] = sum_i coef[o, i] * srcs[i], for `width` words at the byte offsets.

        Per output row, Horner's rule over the bits of its coefficients, from the highest:
        acc = 2 * acc + the sources whose coefficient has that bit (up to three per pass).
        """
        rows, n = coef.shape
        for o in range(rows):
            top = tops[o]
            if top < 0:
                for w in range(width):
                    acc[w] = 0
            for b in range(top, -1, -1):
                count = 0
                for i in range(n):
                    if (coef[o, i] >> b) & 1:
                        picked[count] = srcs[i] + src_offset
                        count += 1
                s = carray(_words_at(picked[0]), width)
                t = carray(_words_at(picked[min(1, count - 1)]), width)
                u = carray(_words_at(picked[min(2, count - 1)]), width)
                q = min(count, 3)
                if b == top:
                    q = 1
                    for w in range(width):
                        acc[w] = s[w]
                elif count == 0:
                    for w in range(width):
                        acc[w] = _double(acc[w])
                elif count == 1:
                    for w in range(width):
                        acc[w] = _double(acc[w]) ^ s[w]
                elif count == 2:
                    for w in range(width):
                        acc[w] = _double(acc[w]) ^ s[w] ^ t[w]
                else:
                    for w in range(width):
                        acc[w] = _double(acc[w]) ^ s[w] ^ t[w] ^ u[w]
                while q < count:
                    s = carray(_words_at(picked[q]), width)
                    t = carray(_words_at(picked[min(q + 1, count - 1)]), width)
                    u = carray(_words_at(picked[min(q + 2, count - 1)]), width)
                    if q + 3 <= count:
                        for w in range(width):
                            acc[w] ^= s[w] ^ t[w] ^ u[w]
                    elif q + 2 == count:
                        for w in range(width):
                            acc[w] ^= s[w] ^ t[w]
                    else:
                        for w in range(width):
                            acc[w] ^= s[w]
                    q += 3
            d = carray(_words_at(dsts[o] + dst_offset), width)
            for w in range(width):
                d[w] = acc[w]

    @njit(inline="always")
    def solve_plan(coef):
        """How to compute coef x y row by row (used for at most 3 columns): each row starts from
        an earlier row (bases, -1: none) if that leaves coefficients 0 or 1 only (md raid6:
        D_y = D_x + P syndrome); rows of 0s and 1s are XORs (xors), the others masked Horner
        sums with masks[o, b, j] = ~0 if bit b of row o's coefficient j (after its base) is set.
        """
        outs, e = coef.shape
        bases = np.empty(outs, np.int64)
        xors = np.empty(outs, np.bool_)
        left = np.empty((outs, e), np.uint8)
        masks = np.zeros((outs, 8, 3), np.uint64)
        for o in range(outs):
            bases[o] = -1
            big = 0
            for j in range(e):
                left[o, j] = coef[o, j]
                big |= coef[o, j] >> 1
            for r in range(o):
                diff = 0
                for j in range(e):
                    diff |= (coef[o, j] ^ coef[r, j]) >> 1
                if big and not diff:
                    bases[o] = r
                    big = 0
                    for j in range(e):
                        left[o, j] = coef[o, j] ^ coef[r, j]
            xors[o] = not big
            for b in range(8):
                for j in range(e):
                    masks[o, b, j] = _ZERO - np.uint64((left[o, j] >> b) & 1)
        return bases, xors, left, masks

    _words_at, _double, _row_tops = words_at, double, row_tops
    _matmul_block, _solve_plan = matmul_block, solve_plan

    @njit(cache=True, nogil=True)
    def matmul_words(coef, srcs, dsts, words):
        """dsts[o] = sum_i coef[o, i] * srcs[i]."""
        rows, n = coef.shape
        tops = _row_tops(coef)
        acc = np.empty(_BLOCK_WORDS, np.uint64)
        picked = np.zeros(n + 1, np.intp)
        for start in range(0, words, _BLOCK_WORDS):
            width = min(_BLOCK_WORDS, words - start)
            offset = 8 * start
            _matmul_block(coef, tops, srcs, offset, dsts, offset, width, acc, picked)

    @njit(cache=True, nogil=True)
    def horner_words(steps, srcs, tails, solve, coef, dsts, words):
        """y[j] = tails[j] + Horner sum of srcs with generator 2^steps[j] (steps 0, 1, 2);
        dsts = coef x y if `solve`, else y.

        Rows with equal steps share one accumulator; P+Q and P+Q+R run as one fused loop.
        """
        rows = steps.shape[0]
        n = srcs.shape[0]
        blk = _BLOCK_WORDS
        need0 = need1 = need2 = False
        for j in range(rows):
            if steps[j] < 0 or steps[j] > 2:
                return False
            need0 |= steps[j] == 0
            need1 |= steps[j] == 1
            need2 |= steps[j] == 2
        first = n  # leading zero blocks add nothing
        for i in range(n - 1, -1, -1):
            if srcs[i] != 0:
                first = i
        acc = np.empty((3, blk), np.uint64)
        outs = coef.shape[0] if solve else 0
        small = rows <= 3  # masked Horner sums for the solve, else matmul_block
        bases, xors, left, masks = _solve_plan(coef if solve and small else coef[:0, :0])
        tops = _row_tops(coef)
        ys = np.empty((rows if solve else 0, blk), np.uint64)
        y_rows = np.empty(ys.shape[0], np.intp)
        for j in range(ys.shape[0]):
            y_rows[j] = ys.ctypes.data + 8 * blk * j
        picked = np.zeros(rows + 1, np.intp)
        solved = np.empty((outs if small else 0, blk), np.uint64)
        for start in range(0, words, blk):
            width = min(blk, words - start)
            if first < n:
                s = carray(_words_at(srcs[first] + 8 * start), width)
                for w in range(width):
                    x = s[w]
                    acc[0, w] = x
                    acc[1, w] = x
                    acc[2, w] = x
            else:
                for w in range(width):
                    acc[0, w] = 0
                    acc[1, w] = 0
                    acc[2, w] = 0
            for i in range(first + 1, n):
                if srcs[i] == 0:
                    if need1:
                        for w in range(width):
                            acc[1, w] = _double(acc[1, w])
                    if need2:
                        for w in range(width):
                            acc[2, w] = _double(_double(acc[2, w]))
                    continue
                s = carray(_words_at(srcs[i] + 8 * start), width)
                if need0 and need1 and need2:
                    for w in range(width):
                        x = s[w]
                        acc[0, w] ^= x
                        acc[1, w] = _double(acc[1, w]) ^ x
                        acc[2, w] = _double(_double(acc[2, w])) ^ x
                elif need0 and need1:
                    for w in range(width):
                        x = s[w]
                        acc[0, w] ^= x
                        acc[1, w] = _double(acc[1, w]) ^ x
                else:
                    if need0:
                        for w in range(width):
                            acc[0, w] ^= s[w]
                    if need1:
                        for w in range(width):
                            acc[1, w] = _double(acc[1, w]) ^ s[w]
                    if need2:
                        for w in range(width):
                            acc[2, w] = _double(_double(acc[2, w])) ^ s[w]
            if not solve:
                for j in range(rows):
                    st = steps[j]
                    d = carray(_words_at(dsts[j] + 8 * start), width)
                    if tails[j] != 0:
                        t = carray(_words_at(tails[j] + 8 * start), width)
                        for w in range(width):
                            d[w] = acc[st, w] ^ t[w]
                    else:
                        for w in range(width):
                            d[w] = acc[st, w]
                continue
            for j in range(rows):
                st = steps[j]
                if tails[j] != 0:
                    t = carray(_words_at(tails[j] + 8 * start), width)
                    for w in range(width):
                        ys[j, w] = acc[st, w] ^ t[w]
                else:
                    for w in range(width):
                        ys[j, w] = acc[st, w]
            if not small:
                _matmul_block(coef, tops, y_rows, 0, dsts, 8 * start, width, acc[0], picked)
                continue
            for o in range(outs):
                base = bases[o]
                if xors[o]:
                    if base >= 0:
                        for w in range(width):
                            solved[o, w] = solved[base, w]
                    else:
                        for w in range(width):
                            solved[o, w] = 0
                    for j in range(rows):
                        if left[o, j]:
                            for w in range(width):
                                solved[o, w] ^= ys[j, w]
                    continue
                mk = masks[o]
                if rows == 1:
                    for w in range(width):
                        x = ys[0, w]
                        r = x & mk[7, 0]
                        for b in range(6, -1, -1):
                            r = _double(r) ^ (x & mk[b, 0])
                        solved[o, w] = r
                elif rows == 2:
                    for w in range(width):
                        x, y = ys[0, w], ys[1, w]
                        r = (x & mk[7, 0]) ^ (y & mk[7, 1])
                        for b in range(6, -1, -1):
                            r = _double(r) ^ (x & mk[b, 0]) ^ (y & mk[b, 1])
                        solved[o, w] = r
                else:
                    for w in range(width):
                        x, y, z = ys[0, w], ys[1, w], ys[2, w]
                        r = (x & mk[7, 0]) ^ (y & mk[7, 1]) ^ (z & mk[7, 2])
                        for b in range(6, -1, -1):
                            r = _double(r) ^ (x & mk[b, 0]) ^ (y & mk[b, 1]) ^ (z & mk[b, 2])
                        solved[o, w] = r
                if base >= 0:
                    for w in range(width):
                        solved[o, w] ^= solved[base, w]
            for o in range(outs):
                d = carray(_words_at(dsts[o] + 8 * start), width)
                for w in range(width):
                    d[w] = solved[o, w]
        return True

    @njit(cache=True, nogil=True)
    def address(a):
        """The address of a 1-D array's first element, -1 if it is not contiguous and aligned."""
        start = a.ctypes.data
        if start % 8 or (a.shape[0] > 1 and a.strides[0] != 1):
            return -1
        return start

    @njit(cache=True, nogil=True)
    def row_addresses(a, out):
        """out = the addresses of a 2-D array's rows; False if not contiguous and aligned."""
        rows, length = a.shape
        start = a.ctypes.data
        step = a.strides[0] if rows > 1 else 0
        if start % 8 or step % 8 or (length > 1 and a.strides[1] != 1):
            return False
        for i in range(rows):
            out[i] = start + i * step
        return True

    affine = _compile_affine() if gfni_usable() else None
    return Kernels(matmul_words, horner_words, address, row_addresses, affine)


_AFFINE_BLOCK = 4096
"""Bytes of each row the GFNI kernel works on at a time (the sources' pieces stay in L1)."""


def _compile_affine() -> Any:  # pragma: no cover - exercised through gf_matmul on GFNI machines
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    bytes64 = ir.VectorType(ir.IntType(8), 64)
    qwords8 = ir.VectorType(ir.IntType(64), 8)

    def affine(builder, src, mat):
        """vgf2p8affineqb of the 64 bytes at address `src` with the 8x8 bit matrix `mat`."""
        x = builder.load(builder.inttoptr(src, bytes64.as_pointer()), align=1)
        m = builder.insert_element(ir.Constant(qwords8, None), mat, ir.Constant(ir.IntType(32), 0))
        m = builder.shuffle_vector(m, ir.Constant(qwords8, None),
                                   ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        fnty = ir.FunctionType(bytes64, [bytes64, bytes64, ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.vgf2p8affineqb.512")
        return builder.call(fn, [x, builder.bitcast(m, bytes64), ir.Constant(ir.IntType(8), 0)])

    @intrinsic
    def affine_set(typingctx, dst, src, mat):
        """The 64 bytes at `dst` = `mat` applied to the 64 bytes at `src`."""
        sig = types.void(types.intp, types.intp, types.uint64)

        def codegen(context, builder, signature, args):
            d, s, m = args
            builder.store(affine(builder, s, m), builder.inttoptr(d, bytes64.as_pointer()),
                          align=1)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def affine_xor(typingctx, dst, src, mat):
        """The 64 bytes at `dst` ^= `mat` applied to the 64 bytes at `src`."""
        sig = types.void(types.intp, types.intp, types.uint64)

        def codegen(context, builder, signature, args):
            d, s, m = args
            dp = builder.inttoptr(d, bytes64.as_pointer())
            y = affine(builder, s, m)
            builder.store(builder.xor(builder.load(dp, align=1), y), dp, align=1)
            return context.get_dummy_value()

        return sig, codegen

    global _affine_set, _affine_xor
    _affine_set, _affine_xor = affine_set, affine_xor

    @njit(cache=True, nogil=True)
    def matmul_affine(mats, srcs, dsts, nbytes):
        """dsts[o] = sum_i mats[o, i] applied to srcs[i], for nbytes (a multiple of 64)."""
        rows, n = mats.shape
        for start in range(0, nbytes, _AFFINE_BLOCK):
            end = min(start + _AFFINE_BLOCK, nbytes)
            for o in range(rows):
                d = dsts[o]
                s = srcs[0]
                m = mats[o, 0]
                for p in range(start, end, 64):
                    _affine_set(d + p, s + p, m)
                for i in range(1, n):
                    s = srcs[i]
                    m = mats[o, i]
                    for p in range(start, end, 64):
                        _affine_xor(d + p, s + p, m)

    return matmul_affine


def get_kernels() -> Kernels:
    """The compiled kernels, compiling (or loading from the disk cache) on first use."""
    global _kernels
    if _kernels is None:
        with _compile_lock:
            if _kernels is None:
                _kernels = _compile_kernels()
    return _kernels


