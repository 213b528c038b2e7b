"""A file exerciser in the manner of fsx: thousands of random operations on one file through a
real mount (write, read, mapped reads and writes, truncate, fallocate's allocate, punch and zero
modes, fsync, close and reopen), each checked against a byte model, so that the kernel's page
cache, the filesystem's dirty buffers and its block map must agree at every step."""

from __future__ import annotations

import mmap
import os
import random

import pytest
from mountutil import scratch_mount
from posixutil import FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, fallocate

MAX_SIZE = 3 << 20
PAGE = mmap.PAGESIZE
OPS = int(os.environ.get("DWFS_EXERCISER_OPS", "3000"))


@pytest.fixture(scope="module")
def mnt():
    with scratch_mount("dwfs-fsx-") as (m, _base):
        yield m


class Exerciser:
    """One file on the mount, two descriptors on it, and the bytes it must hold."""

    def __init__(self, path: str, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.fds = [os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)]
        self.fds.append(os.open(path, os.O_RDWR))
        self.log: list[str] = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def _range(self, beyond: int = 0) -> tuple[int, int]:
        """An offset and a length, often near page and block edges."""
        rng = self.rng
        edge = rng.choice([0, PAGE, 65536, 1 << 20]) * rng.randrange(4)
        off = rng.choice([rng.randrange(len(self.model) + beyond + 1),
                          max(0, edge + rng.choice([-1, 0, 1]))])
        n = rng.choice([1, 17, PAGE - 1, PAGE, PAGE + 1, 65536, 200_000, rng.randrange(1, 1 << 20)])
        off = min(off, MAX_SIZE - 1)
        return off, max(1, min(n, MAX_SIZE - off))

    def step(self) -> None:
        rng = self.rng
        fd = rng.choice(self.fds)
        op = rng.choices(["write", "read", "mapwrite", "mapread", "truncate", "alloc", "punch",
                          "zero", "fsync", "reopen"],
                         [20, 15, 10, 10, 8, 5, 8, 6, 3, 3])[0]
        m = self.model
        if op == "write":
            off, n = self._range(beyond=100_000)
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            m += bytes(max(0, off + n - len(m)))
            m[off : off + n] = data
        elif op == "read":
            off, n = self._range(beyond=10)
            self._check(os.pread(fd, n, off), off, n, op)
        elif op in ("mapwrite", "mapread") and m:
            off, n = self._range()
            off, n = min(off, len(m) - 1), min(n, len(m) - min(off, len(m) - 1))
            base = off - off % PAGE
            with mmap.mmap(fd, off + n - base, offset=base) as mm:
                if op == "mapwrite":
                    data = rng.randbytes(n)
                    mm[off - base :] = data
                    m[off : off + n] = data
                    if rng.random() < 0.5:
                        mm.flush()
                else:
                    self._check(mm[off - base :], off, n, op)
        elif op == "truncate":
            size = rng.choice([0, rng.randrange(len(m) + 1), rng.randrange(MAX_SIZE)])
            os.ftruncate(fd, size)
            del m[size:]
            m += bytes(size - len(m))
        elif op in ("alloc", "punch", "zero"):
            off, n = self._range(beyond=200_000)
            keep = rng.random() < 0.5
            mode = {"alloc": 0, "punch": FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                    "zero": FALLOC_ZERO_RANGE}[op] | (FALLOC_KEEP_SIZE if keep else 0)
            fallocate(fd, mode, off, n)
            end = min(off + n, len(m))
            if op != "alloc" and off < end:
                m[off:end] = bytes(end - off)
            if not mode & FALLOC_KEEP_SIZE:
                m += bytes(max(0, off + n - len(m)))
            op = f"{op} mode {mode:#x}"
            self.log.append(f"{op} {off} {n}")
            return self._sizes(op)
        elif op == "fsync":
            os.fsync(fd)
        elif op == "reopen":
            i = rng.randrange(2)
            os.close(self.fds[i])
            self.fds[i] = os.open(self.path, os.O_RDWR)
        self.log.append(op)
        self._sizes(op)

    def _sizes(self, op: str) -> None:
        for fd in self.fds:
            assert os.fstat(fd).st_size == len(self.model), (op, self.log[-5:])

    def _check(self, got: bytes, off: int, n: int, op: str) -> None:
        want = bytes(self.model[off : off + n])
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                         min(len(got), len(want)))
            raise AssertionError(f"{op} of {n} at {off}: {len(got)} bytes, expected "
                                 f"{len(want)}; first difference at {off + first}; "
                                 f"last steps {self.log[-8:]}")

    def verify_whole(self) -> None:
        """The whole file through a fresh descriptor."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = b""
            while chunk := os.pread(fd, 1 << 20, len(got)):
                got += chunk
        finally:
            os.close(fd)
        self._check(got, 0, len(self.model), "whole-file read")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2])
def test_exerciser(mnt, seed):
    ex = Exerciser(mnt.path(f"fsx-{seed}"), seed)
    try:
        for i in range(OPS):
            ex.step()
            if i % 100 == 99:
                ex.verify_whole()
        ex.verify_whole()
    finally:
        ex.close()
    # After a remount nothing was lost: every byte comes from the volume, not the page cache.
    mnt.umount()
    mnt.mount()
    ex.fds = []
    ex.verify_whole()
