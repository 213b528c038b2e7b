"""raid.xxh3: the batched XXH3-64 gives the xxhash package's values, bit for bit, on every path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from raid import xxh3
from vfs.extents import sector_checksums

MASK = (1 << 64) - 1
DATA = os.urandom(300 * 4096 + 123)


def _want(data: bytes, size: int, seed: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(data[i * size : (i + 1) * size], seed=(seed + i) & MASK)
            for i in range(len(data) // size)]


def test_the_vector_entry_point_is_used_here() -> None:
    """On this machine the package's dispatching entry point loads and passes its check (a
    silent fall back to the slow path would otherwise go unnoticed)."""
    assert xxh3._entry_point() is not None
    assert xxh3._kernels() is not None


@pytest.mark.parametrize("seed", [0, 1, 0x9E3779B97F4A7C15, MASK - 5, MASK, MASK + 7, -3])
@pytest.mark.parametrize("size", [4096, 64, 241, 65536])
def test_each_piece_matches_xxhash(seed: int, size: int) -> None:
    """Seeds wrap modulo 2**64 across the pieces; a trailing part piece is left out."""
    got = xxh3.xxh3_64_each(DATA, size, seed)
    assert got.dtype == np.uint64
    assert got.tolist() == _want(DATA, size, seed)


EACH, NOGIL = xxh3.EACH_BYTES // 4096, xxh3.NOGIL_BYTES // 4096


@pytest.mark.parametrize("n", [0, 1, EACH - 1, EACH, NOGIL - 1, NOGIL, 256])
def test_few_and_many_pieces(n: int) -> None:
    """Below EACH_BYTES the package is called piece by piece; from it on, the compiled loop
    that holds the GIL, and from NOGIL_BYTES on, the one that lets go of it."""
    data = DATA[: n * 4096]
    assert xxh3.xxh3_64_each(data, 4096, 77).tolist() == _want(data, 4096, 77)


def test_buffers_of_every_kind() -> None:
    """bytes, bytearray, a read-only numpy array, a memoryview slice, a non-contiguous view
    and a buffer of another item size all hash their bytes."""
    want = _want(DATA[:64 * 4096], 4096, 9)
    ro = np.frombuffer(DATA[:64 * 4096], np.uint8)
    assert not ro.flags.writeable
    words = np.frombuffer(DATA[:64 * 4096], np.uint64)
    for buf in (DATA[:64 * 4096], bytearray(DATA[:64 * 4096]), ro, memoryview(DATA)[:64 * 4096],
                words):
        assert xxh3.xxh3_64_each(buf, 4096, 9).tolist() == want
    doubled = np.frombuffer(DATA[:128 * 4096], np.uint8).reshape(128, 4096)[::2]
    assert not doubled.flags.c_contiguous
    assert xxh3.xxh3_64_each(doubled, 4096, 3).tolist() == _want(doubled.tobytes(), 4096, 3)


def test_sector_checksums_are_unchanged() -> None:
    """The file sector checksums stored by earlier versions still verify: the packed form of
    per-sector xxh3 seeded with inode * golden + sector."""
    for ino, first in [(2, 0), (123456789, 77), ((1 << 62) + 3, 1 << 40), (MASK, MASK)]:
        seed = ino * 0x9E3779B97F4A7C15 + first
        want = b"".join(v.to_bytes(8, "little") for v in _want(DATA, 4096, seed))
        assert sector_checksums(DATA, ino, first) == want


def test_portable_fallback_gives_the_same_values() -> None:
    """With DWFS_XXH3_PORTABLE set, only the package is used, with the same results."""
    code = ("import os, sys; from raid import xxh3; d = bytes(range(256)) * 1600; "
            "assert xxh3._entry_point() is None; "
            "sys.stdout.write(repr(xxh3.xxh3_64_each(d, 4096, 2**64 - 2).tolist()))")
    env = dict(os.environ, **{xxh3.PORTABLE_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    data = bytes(range(256)) * 1600
    assert out == repr(_want(data, 4096, 2**64 - 2))
