"""File contents: per-file dirty buffers over the block map (vfs/extents.py) on the volume.

A file is cut into blocks of BLOCK bytes (one extent group). Writes gather in dirty blocks: a
buffer with a mask of the 4 KiB sectors written. Whole blocks written in order go to the volume
at once, the rest at the next write-out. Only the sectors written are stored, each to newly
allocated volume sectors (copy-on-write); the sectors they replace are freed only once the
metadata commit that stops using them is durable. All-zero sectors are not stored (holes). A
write covering part of a sector first reads that one sector.

Invariant: bytes of a stored sector beyond the file's size are zero.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from vfs.alloc import SECTOR, Allocator
from vfs.extents import GROUP, GROUP_SECTORS, Extent, ExtentMap, sector_checksums
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

BLOCK = GROUP
SECTORS_PER_BLOCK = GROUP_SECTORS
FULL = (1 << SECTORS_PER_BLOCK) - 1
DIRTY_LIMIT = 64 * 1024 * 1024
_ZERO_SECTOR = bytes(SECTOR)


class VolumeLike(Protocol):
    """What file contents need of the redundant volume."""

    capacity: int

    def read(self, offset: int, length: int) -> bytearray: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


class DirtyBlock:
    """A block's unwritten sectors: a BLOCK-sized buffer and a mask of the sectors it holds."""

    __slots__ = ("buf", "mask")

    def __init__(self) -> None:
        self.buf = bytearray(BLOCK)
        self.mask = 0


def bit_runs(mask: int) -> list[tuple[int, int]]:
    """Runs [a, b) of set bits of a sector mask, lowest first."""
    if mask == FULL:
        return [(0, SECTORS_PER_BLOCK)]
    out = []
    at = 0
    while mask:
        zeros = (mask & -mask).bit_length() - 1
        mask >>= zeros
        at += zeros
        ones = (~mask & (mask + 1)).bit_length() - 1
        out.append((at, at + ones))
        mask >>= ones
        at += ones
    return out


def _runs_of(exts: list[Extent]) -> list[list[Extent]]:
    """Extents grouped into runs that are back to back both in the file and on the volume."""
    runs: list[list[Extent]] = []
    for e in exts:
        if runs and runs[-1][-1].end == e.sector and runs[-1][-1].addr + runs[-1][-1].nsect \
                == e.addr:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _copy(out: bytearray, offset: int, end: int, start: int, data) -> None:
    """Copy the part of `data` (file bytes from `start`) inside [offset, end) into `out`."""
    lo, hi = max(offset, start), min(end, start + len(data))
    if hi > lo:
        out[lo - offset : hi - offset] = data[lo - start : hi - start]


def _spans(cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted sector ranges merged where they lie within a group of each other (one lookup
    each)."""
    spans: list[tuple[int, int]] = []
    for lo, hi in cuts:
        if spans and lo - spans[-1][1] < GROUP_SECTORS:
            spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
        else:
            spans.append((lo, hi))
    return spans


class FileData:
    """Reads, writes and truncates file contents; owns the dirty buffers."""

    def __init__(self, db: MetaDB, volume: VolumeLike, alloc: Allocator) -> None:
        self.db = db
        self.volume = volume
        self.alloc = alloc
        self.map = ExtentMap(db, volume)
        self.dirty: dict[int, dict[int, DirtyBlock]] = {}
        self.dirty_bytes = 0
        self._seq_end: dict[int, int] = {}

    # --- reading ------------------------------------------------------------------------------

    def read(self, ino: int, size: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset + length) of a file of `size` bytes (short at the end)."""
        end = min(size, offset + length)
        if offset >= end:
            return b""
        s0, s1 = offset // SECTOR, (end - 1) // SECTOR
        exts = self.map.overlapping(ino, s0, s1)
        blocks: list[int] = []
        dirty = self.dirty.get(ino)
        if dirty:
            b0, b1 = offset // BLOCK, (end - 1) // BLOCK
            blocks = sorted(b for b in dirty if b0 <= b <= b1)
        runs = _runs_of(exts)
        if not blocks and len(runs) == 1 and exts[0].sector <= s0 and exts[-1].end > s1:
            raw, at = self.map.read_run(ino, exts, s0, s1 + 1)
            p = offset - at * SECTOR
            return raw[p : p + end - offset]  # the whole answer, without a copy
        out = bytearray(end - offset)
        for run in runs:
            raw, at = self.map.read_run(ino, run, s0, s1 + 1)
            _copy(out, offset, end, at * SECTOR, raw)
        for b in blocks:
            d = dirty[b]  # type: ignore[index]
            view = memoryview(d.buf)
            for a, z in bit_runs(d.mask):
                _copy(out, offset, end, b * BLOCK + a * SECTOR, view[a * SECTOR : z * SECTOR])
        return out

    def _fill(self, ino: int, d: DirtyBlock, blk: int, s: int, size: int) -> None:
        """Put the stored contents of sector `s` of block `blk` into the dirty buffer."""
        sector = blk * SECTORS_PER_BLOCK + s
        region = memoryview(d.buf)[s * SECTOR : (s + 1) * SECTOR]
        exts = self.map.overlapping(ino, sector, sector) if sector * SECTOR < size else []
        if not exts:
            region[:] = _ZERO_SECTOR
            return
        raw, at = self.map.read_run(ino, exts, sector, sector + 1)
        p = (sector - at) * SECTOR
        region[:] = raw[p : p + SECTOR]

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
        ready: list[tuple[int, bytes | bytearray | memoryview, int]] = []
        for blk in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            bs = blk * BLOCK
            lo, hi = max(offset, bs), min(end, bs + BLOCK)
            piece = view[lo - offset : hi - offset]
            if lo == bs and hi == bs + BLOCK:
                if dirty.pop(blk, None) is not None:
                    self.dirty_bytes -= BLOCK
                ready.append((blk, piece, FULL))
                continue
            d = dirty.get(blk)
            if d is None:
                d = dirty[blk] = DirtyBlock()
                self.dirty_bytes += BLOCK
            a, z = (lo - bs) // SECTOR, (hi - bs - 1) // SECTOR + 1
            if lo % SECTOR and not d.mask >> a & 1:
                self._fill(ino, d, blk, a, size)
                d.mask |= 1 << a
            if hi % SECTOR and not d.mask >> (z - 1) & 1:
                self._fill(ino, d, blk, z - 1, size)
            d.buf[lo - bs : hi - bs] = piece
            d.mask |= ((1 << z) - 1) ^ ((1 << a) - 1)
            if hi == bs + BLOCK and sequential:
                ready.append((blk, d.buf, d.mask))
                del dirty[blk]
                self.dirty_bytes -= BLOCK
        self._seq_end[ino] = end
        if ready:
            self.store(ino, ready, new_size)
        if not dirty:
            del self.dirty[ino]
        if self.dirty_bytes > DIRTY_LIMIT:
            self.write_out_all(lambda i: new_size if i == ino else None)
        return new_size

    def store(self, ino: int, blocks: list[tuple[int, bytes | bytearray | memoryview, int]],
              size: int) -> None:
        """Put the masked sectors of whole blocks (block number, BLOCK bytes, sector mask) of a
        file of `size` bytes onto the volume and into the block map."""
        blocks.sort(key=lambda b: b[0])
        in_file = -(-size // SECTOR)
        cuts: list[tuple[int, int]] = []  # file sectors replaced
        pieces: list[tuple[int, int, memoryview]] = []  # non-zero runs: first, count, bytes
        for blk, data, mask in blocks:
            first = blk * SECTORS_PER_BLOCK
            if in_file - first < SECTORS_PER_BLOCK:
                mask &= (1 << max(0, in_file - first)) - 1
            if not mask:
                continue
            view = memoryview(data)
            nonzero = np.frombuffer(view, np.uint64).reshape(SECTORS_PER_BLOCK, -1).any(axis=1)
            for a, z in bit_runs(mask):
                cuts.append((first + a, first + z))
                s = a
                while s < z:
                    if not nonzero[s]:
                        s += 1
                        continue
                    t = s + 1
                    while t < z and nonzero[t]:
                        t += 1
                    pieces.append((first + s, t - s, view[s * SECTOR : t * SECTOR]))
                    s = t
        if not cuts:
            return
        exts = [e for lo, hi in _spans(cuts) for e in self.map.overlapping(ino, lo, hi - 1)]
        delete, keep, freed = self.map.cut(ino, exts, cuts)
        new = self._write_pieces(ino, pieces)
        self.map.apply(ino, delete, keep + new)
        for addr, n in freed:
            self.alloc.hold(addr, n)
        delta = sum(e.nsect for e in new) - sum(n for _a, n in freed)
        if delta:
            self.db.change("UPDATE inodes SET sectors=sectors+? WHERE id=?", (delta, ino))

    def _write_pieces(self, ino: int, pieces: list[tuple[int, int, memoryview]]) -> list[Extent]:
        """Write runs of file sectors to newly allocated volume sectors; returns their extents."""
        if not pieces:
            return []
        starts = self.alloc.allocate_each([p[1] for p in pieces])
        out = []
        i = 0
        while i < len(pieces):
            j = i + 1
            while j < len(pieces) and starts[j] == starts[j - 1] + pieces[j - 1][1]:
                j += 1
            views = [p[2] for p in pieces[i:j]]
            self.volume.write(starts[i] * SECTOR, views[0] if j == i + 1 else b"".join(views))
            for (first, n, v), start in zip(pieces[i:j], starts[i:j], strict=True):
                out.append(Extent(first, n, start, sector_checksums(v, ino, first), None))
            i = j
        return out

    def write_out(self, ino: int, size: int) -> None:
        """Store every dirty block of one file."""
        dirty = self.dirty.get(ino)
        if not dirty:
            self.dirty.pop(ino, None)
            return
        blocks = sorted(dirty.items())
        self.store(ino, [(b, d.buf, d.mask) for b, d in blocks], size)
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
        keep = -(-new_size // SECTOR)  # sectors that stay
        last = (keep - 1) // SECTORS_PER_BLOCK if keep else -1
        dirty = self.dirty.get(ino, {})
        for blk in [b for b in dirty if b > last]:
            del dirty[blk]
            self.dirty_bytes -= BLOCK
        d = dirty.get(last)
        if d is not None and keep % SECTORS_PER_BLOCK:
            d.mask &= (1 << keep % SECTORS_PER_BLOCK) - 1
        delete, kept, freed = self.map.cut_from(ino, keep)
        if delete:
            self.map.apply(ino, delete, kept)
            for addr, n in freed:
                self.alloc.hold(addr, n)
            self.db.change("UPDATE inodes SET sectors=sectors-? WHERE id=?",
                           (sum(n for _a, n in freed), ino))
        tail = new_size % SECTOR
        if tail:
            s = (keep - 1) % SECTORS_PER_BLOCK
            if d is None:
                d = dirty[last] = DirtyBlock()
                self.dirty_bytes += BLOCK
                self.dirty[ino] = dirty
            if not d.mask >> s & 1:
                self._fill(ino, d, last, s, size)
                d.mask |= 1 << s
            d.buf[s * SECTOR + tail : (s + 1) * SECTOR] = bytes(SECTOR - tail)
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
        for addr, nsect in self.map.drop(ino):
            self.alloc.hold(addr, nsect)

    def dirty_sectors(self, ino: int) -> int:
        """Sectors the file's unwritten blocks will take at most (for st_blocks)."""
        return sum(d.mask.bit_count() for d in self.dirty.get(ino, {}).values())
