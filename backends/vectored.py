"""Vectored I/O on a file descriptor carried to completion across short transfers, and the
aligned buffers that direct I/O needs."""

from __future__ import annotations

import os

import numpy as np

DIRECT_ALIGN = 4096  # offset, length and memory address of a transfer with O_DIRECT


def aligned_empty(n: int) -> np.ndarray:
    """An uninitialised uint8 array of `n` bytes starting on a DIRECT_ALIGN boundary."""
    raw = np.empty(n + DIRECT_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return raw[start : start + n]


def skip(buffers: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left once the first `n` bytes of `buffers` are done."""
    for i, b in enumerate(buffers):
        if n < len(b):
            return [b[n:], *buffers[i + 1 :]]
        n -= len(b)
    return []


def pwritev_all(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> None:
    """pwritev `buffers` at `offset` until every byte is written (RWF_* `flags`)."""
    while buffers:
        n = os.pwritev(fd, buffers, offset, flags)
        offset += n
        buffers = skip(buffers, n)


def preadv_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """preadv into `buffers` from `offset` until they are full or the file ends; returns the
    number of bytes read."""
    total = sum(len(b) for b in buffers)
    done = 0
    while done < total:
        n = os.preadv(fd, buffers, offset + done)
        if n == 0:
            break
        done += n
        if done < total:
            buffers = skip(buffers, n)
    return done
