"""File contents: a block map in the metadata database over sectors of the volume.

A file is cut into blocks of BLOCK bytes. Each stored block lives in `nsect` consecutive 4 KiB
sectors of the volume (the tail block of a file only as many as it needs) and carries an
xxh3 checksum seeded with its inode and block number. Blocks that are all zeros are not stored
(holes). Rewritten blocks always go to newly allocated sectors (copy-on-write); the old sectors
are freed only once the metadata commit that stops using them is durable.

Partial writes are gathered in per-inode dirty buffers; full blocks go to the volume at once.
Invariant: bytes of a stored block beyond the file's size are zero.
"""

from __future__ import annotations

import errno
import logging
from typing import Protocol

import numpy as np
import xxhash

from vfs.alloc import SECTOR, Allocator
from vfs.errors import FSError
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
SECTORS_PER_BLOCK = BLOCK // SECTOR
DIRTY_LIMIT = 64 * 1024 * 1024
_MASK63 = (1 << 63) - 1


class VolumeLike(Protocol):
    """What file contents need of the redundant volume."""

    capacity: int

    def read(self, offset: int, length: int) -> bytearray: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


def block_checksum(data: bytes | bytearray | memoryview, ino: int, blkno: int) -> int:
    """Checksum of a stored block's bytes, tied to its inode and block number."""
    seed = (ino * 0x9E3779B97F4A7C15 + blkno) & 0xFFFF_FFFF_FFFF_FFFF
    return xxhash.xxh3_64_intdigest(data, seed=seed) & _MASK63


def _sectors_for(valid: int) -> int:
    return -(-valid // SECTOR)


class FileData:
    """Reads, writes and truncates file contents; owns the dirty buffers."""

    def __init__(self, db: MetaDB, volume: VolumeLike, alloc: Allocator) -> None:
        self.db = db
        self.volume = volume
        self.alloc = alloc
        self.dirty: dict[int, dict[int, bytearray]] = {}
        self.dirty_bytes = 0
        self._seq_end: dict[int, int] = {}

    # --- reading ------------------------------------------------------------------------------

    def read(self, ino: int, size: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset + length) of a file of `size` bytes (short at the end)."""
        end = min(size, offset + length)
        if offset >= end:
            return b""
        b0, b1 = offset // BLOCK, (end - 1) // BLOCK
        dirty = self.dirty.get(ino, {})
        mapped = {
            r[0]: (r[1], r[2], r[3])
            for r in self.db.rows(
                "SELECT blkno, addr, nsect, csum FROM blocks "
                "WHERE inode=? AND blkno BETWEEN ? AND ?", (ino, b0, b1))
        }
        out: bytearray | None = None
        blk = b0
        while blk <= b1:
            if blk in dirty:
                out = out if out is not None else bytearray(end - offset)
                self._place(out, offset, end, blk, dirty[blk])
                blk += 1
                continue
            m = mapped.get(blk)
            if m is None:
                blk += 1
                continue
            # A run of blocks stored back to back: one volume read.
            run = [blk]
            while (blk + len(run) <= b1 and (nxt := mapped.get(blk + len(run))) is not None
                   and blk + len(run) not in dirty
                   and nxt[0] == mapped[run[-1]][0] + mapped[run[-1]][1]):
                run.append(blk + len(run))
            nbytes = sum(mapped[b][1] for b in run) * SECTOR
            raw = memoryview(self.volume.read(m[0] * SECTOR, nbytes))
            pos = 0
            for b in run:
                addr, nsect, csum = mapped[b]
                self._verify(raw[pos : pos + nsect * SECTOR], ino, b, addr, csum)
                pos += nsect * SECTOR
            bs = b0 * BLOCK
            if out is None and blk == b0 and run[-1] == b1 and end - bs <= nbytes:
                return raw[offset - bs : end - bs]  # the whole answer, without a copy
            out = out if out is not None else bytearray(end - offset)
            pos = 0
            for b in run:
                nsect = mapped[b][1]
                self._place(out, offset, end, b, raw[pos : pos + nsect * SECTOR])
                pos += nsect * SECTOR
            blk += len(run)
        return out if out is not None else bytes(end - offset)

    @staticmethod
    def _place(out: bytearray, offset: int, end: int, blk: int, data) -> None:
        """Copy the part of block `blk` inside [offset, end) into `out` (data may be short)."""
        bs = blk * BLOCK
        lo, hi = max(offset, bs), min(end, bs + len(data))
        if hi > lo:
            out[lo - offset : hi - offset] = data[lo - bs : hi - bs]

    @staticmethod
    def _verify(data, ino: int, blk: int, addr: int, csum: int) -> None:
        if block_checksum(data, ino, blk) != csum:
            log.error("inode %d block %d (volume sector %d): checksum mismatch; the block "
                      "on the volume is not what was written there", ino, blk, addr)
            raise FSError(errno.EIO, f"inode {ino} block {blk}: checksum mismatch")

    def _load(self, ino: int, blk: int, size: int) -> bytearray:
        """A block's current contents as a full-size buffer (zeros past the end of file)."""
        if blk * BLOCK >= size:
            return bytearray(BLOCK)
        r = self.db.row("SELECT addr, nsect, csum FROM blocks WHERE inode=? AND blkno=?",
                        (ino, blk))
        buf = bytearray(BLOCK)
        if r is not None:
            addr, nsect, csum = r
            raw = self.volume.read(addr * SECTOR, nsect * SECTOR)
            self._verify(raw, ino, blk, addr, csum)
            buf[: len(raw)] = raw
        return buf

    # --- writing ------------------------------------------------------------------------------

    def write(self, ino: int, size: int, offset: int, data: bytes | memoryview) -> int:
        """Write `data` at `offset` of a file of `size` bytes; returns the new size."""
        view = memoryview(data)
        end = offset + len(view)
        new_size = max(size, end)
        if not len(view):
            return size
        dirty = self.dirty.setdefault(ino, {})
        sequential = self._seq_end.get(ino) == offset
        ready: list[tuple[int, bytes | bytearray | memoryview]] = []
        for blk in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            bs = blk * BLOCK
            lo, hi = max(offset, bs), min(end, bs + BLOCK)
            piece = view[lo - offset : hi - offset]
            if lo == bs and hi == bs + BLOCK:
                if dirty.pop(blk, None) is not None:
                    self.dirty_bytes -= BLOCK
                ready.append((blk, piece))
                continue
            buf = dirty.get(blk)
            if buf is None:
                buf = self._load(ino, blk, size)
                dirty[blk] = buf
                self.dirty_bytes += BLOCK
            buf[lo - bs : hi - bs] = piece
            if hi == bs + BLOCK and sequential:
                ready.append((blk, dirty.pop(blk)))
                self.dirty_bytes -= BLOCK
        self._seq_end[ino] = end
        if ready:
            self.store(ino, ready, new_size)
        if not dirty:
            del self.dirty[ino]
        if self.dirty_bytes > DIRTY_LIMIT:
            self.write_out_all(lambda i: new_size if i == ino else None)
        return new_size

    def store(self, ino: int, blocks: list[tuple[int, bytes | bytearray | memoryview]],
              size: int) -> None:
        """Put whole blocks of a file of `size` bytes onto the volume and into the block map."""
        blocks.sort(key=lambda b: b[0])
        holes: list[int] = []
        keep: list[tuple[int, memoryview, int]] = []
        for blk, data in blocks:
            valid = min(BLOCK, size - blk * BLOCK)
            if valid <= 0:
                continue
            nsect = _sectors_for(valid)
            view = memoryview(data)[: nsect * SECTOR]
            if not np.frombuffer(view, dtype=np.uint8).any():
                holes.append(blk)
            else:
                keep.append((blk, view, nsect))
        old = {
            r[0]: (r[1], r[2])
            for r in self.db.rows(
                "SELECT blkno, addr, nsect FROM blocks WHERE inode=? AND blkno BETWEEN ? AND ?",
                (ino, blocks[0][0], blocks[-1][0]))
        }
        rows: list[tuple[int, int, int, int, int]] = []
        if keep:
            rows = self._write_runs(ino, keep)
            self.db.changemany(
                "INSERT OR REPLACE INTO blocks (inode, blkno, addr, nsect, csum) "
                "VALUES (?, ?, ?, ?, ?)", rows)
        if holes:
            self.db.changemany("DELETE FROM blocks WHERE inode=? AND blkno=?",
                               [(ino, b) for b in holes])
        delta = sum(r[3] for r in rows)
        for blk in [r[1] for r in rows] + holes:
            o = old.get(blk)
            if o is not None:
                self.alloc.hold(o[0], o[1])
                delta -= o[1]
        if delta:
            self.db.change("UPDATE inodes SET sectors=sectors+? WHERE id=?", (delta, ino))

    def _write_runs(self, ino: int, keep: list[tuple[int, memoryview, int]]
                    ) -> list[tuple[int, int, int, int, int]]:
        """Write blocks to newly allocated sectors; returns their block-map rows."""
        starts = self.alloc.allocate_each([k[2] for k in keep])
        rows = []
        i = 0
        while i < len(keep):
            j = i + 1
            while j < len(keep) and starts[j] == starts[j - 1] + keep[j - 1][2]:
                j += 1
            pieces = [k[1] for k in keep[i:j]]
            self.volume.write(starts[i] * SECTOR, pieces[0] if j == i + 1 else b"".join(pieces))
            for (blk, view, nsect), start in zip(keep[i:j], starts[i:j], strict=True):
                rows.append((ino, blk, start, nsect, block_checksum(view, ino, blk)))
            i = j
        return rows

    def write_out(self, ino: int, size: int) -> None:
        """Store every dirty block of one file."""
        dirty = self.dirty.get(ino)
        if not dirty:
            self.dirty.pop(ino, None)
            return
        blocks = sorted(dirty.items())
        self.store(ino, list(blocks), size)
        del self.dirty[ino]
        self.dirty_bytes -= BLOCK * len(blocks)

    def write_out_all(self, size_of=None) -> None:
        """Store every dirty block of every file."""
        for ino in list(self.dirty):
            size = size_of(ino) if size_of is not None else None
            if size is None:
                size = self.db.value("SELECT size FROM inodes WHERE id=?", (ino,), 0)
            self.write_out(ino, size)

    # --- truncating and dropping --------------------------------------------------------------

    def truncate(self, ino: int, size: int, new_size: int) -> None:
        """Change a file's length from `size` to `new_size` (the caller records the size)."""
        self._seq_end.pop(ino, None)
        if new_size >= size:
            return
        last = (new_size - 1) // BLOCK if new_size else -1
        dirty = self.dirty.get(ino, {})
        for blk in [b for b in dirty if b > last]:
            del dirty[blk]
            self.dirty_bytes -= BLOCK
        gone = list(self.db.rows(
            "SELECT addr, nsect FROM blocks WHERE inode=? AND blkno>?", (ino, last)))
        if gone:
            self.db.change("DELETE FROM blocks WHERE inode=? AND blkno>?", (ino, last))
            for addr, nsect in gone:
                self.alloc.hold(addr, nsect)
            self.db.change("UPDATE inodes SET sectors=sectors-? WHERE id=?",
                           (sum(g[1] for g in gone), ino))
        tail = new_size % BLOCK
        if tail:
            buf = dirty.get(last)
            if buf is None:
                buf = self._load(ino, last, size)
                dirty[last] = buf
                self.dirty_bytes += BLOCK
                self.dirty[ino] = dirty
            buf[tail:] = bytes(BLOCK - tail)
        if not dirty:
            self.dirty.pop(ino, None)

    def drop(self, ino: int, stored: bool = True) -> None:
        """Forget a deleted file's contents and free its sectors (`stored`: it has some)."""
        dirty = self.dirty.pop(ino, None)
        if dirty:
            self.dirty_bytes -= BLOCK * len(dirty)
        self._seq_end.pop(ino, None)
        if not stored:
            return
        for addr, nsect in self.db.rows("SELECT addr, nsect FROM blocks WHERE inode=?", (ino,)):
            self.alloc.hold(addr, nsect)
        self.db.change("DELETE FROM blocks WHERE inode=?", (ino,))

    def dirty_sectors(self, ino: int) -> int:
        """Sectors the file's unwritten blocks will take at most (for st_blocks)."""
        return len(self.dirty.get(ino, ())) * SECTORS_PER_BLOCK
