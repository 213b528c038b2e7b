"""Vectored I/O on a file descriptor carried to completion across short transfers."""

from __future__ import annotations

import os


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
