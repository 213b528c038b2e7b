"""A disk that loses power: a FUSE filesystem whose files keep every write since their last
fsync in a volatile cache, as a disk's write cache and the page cache do.

Usage: python tests/powercutfs.py DURABLE MNT SEED
(stays in the foreground)

MNT shows DURABLE (scripts/passthroughfs.py's passthrough). Names (create, rename, unlink,
mkdir) reach DURABLE at once; file data and sizes reach it only on fsync or fdatasync of the
file. Until then they live in this process, and reads see them.

Pulling the plug: of each file's unsynced 4 KiB blocks, a random half (random.Random(SEED))
reaches DURABLE, in no order, with the unsynced size or truncation or without, as a disk may
have written back part of its cache; then the process ends at once. SIGTERM pulls it now.
SIGUSR1 pulls it at one of the next 1-8 fsyncs (chosen by SEED), as that fsync begins: the
moment an fsync-ordering mistake shows. SIGKILL loses every unsynced write.

A test helper, not a product: it serves the tests that pull the plug under dwfs.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import types
from pathlib import Path
from typing import NoReturn

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from passthroughfs import Passthrough, fuse_errors, mount_and_serve  # noqa: E402

log = logging.getLogger("powercutfs")

BLOCK = 4096  # the unit the disk writes whole or not at all
# open(2) flags the daemon must not pass on: it positions and truncates itself, and its
# buffers are not aligned for O_DIRECT.
STRIPPED = os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_DIRECT


class Unsynced:
    """One file's writes since its last fsync."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd  # a descriptor of the durable file, kept until the writes land
        self.durable_size = size
        self.size = size  # the size readers see
        self.cut = size  # durable bytes at or past this read as zeros (a truncate since)
        self.blocks: dict[int, bytearray] = {}  # block number -> its whole new content

    def read(self, offset: int, length: int) -> bytes:
        """What a reader sees: the durable bytes, the cut, then the new blocks over them."""
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        durable_end = min(end, self.cut)
        if durable_end > offset:
            got = os.pread(self.fd, durable_end - offset, offset)
            out[: len(got)] = got
        for b in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            blk = self.blocks.get(b)
            if blk is not None:
                start = b * BLOCK
                lo, hi = max(offset, start), min(end, start + BLOCK)
                out[lo - offset : hi - offset] = blk[lo - start : hi - start]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Keep `data` at `offset`, whole blocks at a time."""
        pos, end = offset, offset + len(data)
        while pos < end:
            b = pos // BLOCK
            start = b * BLOCK
            blk = self.blocks.get(b)
            if blk is None:
                blk = bytearray(self.read(start, BLOCK).ljust(BLOCK, b"\0"))
                self.blocks[b] = blk
            n = min(end, start + BLOCK) - pos
            blk[pos - start : pos - start + n] = data[pos - offset : pos - offset + n]
            pos += n
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        """Set the size; bytes past it read as zeros if the file grows again."""
        if size < self.size:
            self.cut = min(self.cut, size)
            for b in [b for b in self.blocks if b * BLOCK >= size]:
                del self.blocks[b]
            tail = self.blocks.get(size // BLOCK)
            if tail is not None:
                tail[size % BLOCK :] = bytes(BLOCK - size % BLOCK)
        self.size = size

    def land(self, rng: random.Random | None = None) -> int:
        """Write the cached state to the durable file: all of it (rng None, an fsync), or what
        a disk losing power may have written of it (each block and the size by a coin).
        Returns how many blocks were written."""
        if self.cut < self.durable_size and (rng is None or rng.random() < 0.5):
            os.ftruncate(self.fd, self.cut)
        landed = 0
        for b, blk in sorted(self.blocks.items()):
            n = min(BLOCK, self.size - b * BLOCK)
            if n > 0 and (rng is None or rng.random() < 0.5):
                os.pwrite(self.fd, blk[:n], b * BLOCK)
                landed += 1
        if rng is None or rng.random() < 0.5:
            os.ftruncate(self.fd, self.size)
        return landed


class PowerCutFS(Passthrough):
    """The passthrough with a volatile cache in front of every file's data."""

    def __init__(self, source: str, seed: int) -> None:
        super().__init__(source, inline_io=True)
        self.unsynced: dict[int, Unsynced] = {}  # inode -> its unsynced writes
        self.rng = random.Random(seed)
        self.fsyncs_left: int | None = None  # armed: the plug goes at this many fsyncs on

    def arm(self) -> None:
        """Pull the plug as one of the next few fsyncs begins."""
        self.fsyncs_left = self.rng.randint(1, 8)
        log.info("armed: the plug goes at the %d. fsync from now", self.fsyncs_left)

    def _unsynced(self, inode: int, fd: int) -> Unsynced:
        u = self.unsynced.get(inode)
        if u is None:
            # Its own read-write descriptor: the caller's may be write-only.
            u = Unsynced(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), os.fstat(fd).st_size)
            self.unsynced[inode] = u
        return u

    def _attrs(self, st: os.stat_result, ino: int | None = None) -> pyfuse3.EntryAttributes:
        a = super()._attrs(st, ino)
        u = self.unsynced.get(a.st_ino)
        if u is not None:
            a.st_size = u.size
        return a

    @fuse_errors
    async def open(self, inode, flags, ctx):
        """Open the durable file; O_TRUNC becomes an unsynced truncate."""
        fd = os.open(self._path(inode), flags & ~STRIPPED)
        if flags & os.O_TRUNC:
            self._unsynced(inode, fd).truncate(0)
        return self._opened(fd, inode)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        """Create the file (its name is durable at once) and open it."""
        return await super().create(parent_inode, name, mode, flags & ~os.O_DIRECT, ctx)

    @fuse_errors
    async def read(self, fh, off, size):
        """Read what the file holds, unsynced writes included."""
        u = self.unsynced.get(self.fd_inode[fh])
        return os.pread(fh, size, off) if u is None else u.read(off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        """Keep the write in the cache."""
        self._unsynced(self.fd_inode[fh], fh).write(off, bytes(buf))
        return len(buf)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        """A size change is unsynced; the rest passes through."""
        if fields.update_size:
            if fh is None:
                fd = os.open(self._path(inode), os.O_RDWR)
                try:
                    self._unsynced(inode, fd).truncate(attr.st_size)
                finally:
                    os.close(fd)
            else:
                self._unsynced(inode, fh).truncate(attr.st_size)
            rest = {k: getattr(fields, k) for k in dir(fields) if k.startswith("update_")}
            fields = types.SimpleNamespace(**{**rest, "update_size": False})
        return await super().setattr(inode, attr, fields, fh, ctx)

    @fuse_errors
    async def fsync(self, fh, datasync):
        """Land the file's unsynced writes, then sync the durable file."""
        if self.fsyncs_left is not None:
            self.fsyncs_left -= 1
            if not self.fsyncs_left:
                self.pull_the_plug()
        u = self.unsynced.pop(self.fd_inode[fh], None)
        if u is not None:
            try:
                u.land()
            finally:
                os.close(u.fd)
        os.fsync(fh)

    def pull_the_plug(self) -> NoReturn:
        """Keep what a disk had written back of its cache when the power went, say how much
        was unsynced and how much of that landed (on stderr), and end the process."""
        blocks = landed = 0
        for _inode, u in sorted(self.unsynced.items()):
            blocks += len(u.blocks)
            landed += u.land(self.rng)
            os.fsync(u.fd)
        print(f"pulled the plug: {blocks} unsynced blocks in {len(self.unsynced)} files, "
              f"{landed} landed", file=sys.stderr, flush=True)
        os._exit(0)


async def serve(ops: PowerCutFS) -> None:
    """Answer requests until unmounted (then land every write, a clean shutdown) or the plug
    is pulled (SIGTERM now, SIGUSR1 at an fsync soon)."""

    async def fuse(nursery: trio.Nursery) -> None:
        await pyfuse3.main()
        nursery.cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fuse, nursery)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    ops.arm()
                else:
                    ops.pull_the_plug()
    for u in ops.unsynced.values():
        u.land()
        os.fsync(u.fd)


def main(argv: list[str] | None = None) -> int:
    """Mount DURABLE at MNT and serve until unmounted or the plug is pulled."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        sys.stderr.write("usage: powercutfs.py DURABLE MNT SEED\n")
        return 2
    durable, mountpoint, seed = args
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="powercutfs: %(levelname)s %(message)s")
    os.umask(0)
    ops = PowerCutFS(durable, int(seed))
    mount_and_serve(ops, mountpoint, "powercutfs", serve, ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
