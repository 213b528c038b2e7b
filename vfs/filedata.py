"""File contents: per-file dirty buffers over the block map (vfs/extents.py) on the volume.

A file is cut into blocks of BLOCK bytes. Writes gather in dirty blocks: the
4 KiB sectors written, each in a buffer of its own. Whole blocks go to the volume at once, as
do blocks a sequential writer completes; the rest wait for the next write-out. Only the sectors
written are stored, each to newly allocated volume sectors (copy-on-write); the sectors they
replace are freed only once the metadata commit that stops using them is durable. All-zero
sectors are not stored (holes). A write covering part of a sector first reads that sector.

Invariant: bytes of a stored sector beyond the file's size are zero.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from vfs.alloc import SECTOR, Allocator
from vfs.extents import GROUP_SECTORS, Extent, ExtentMap, sector_checksums
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
SECTORS_PER_BLOCK = BLOCK // SECTOR
DIRTY_LIMIT = 64 * 1024 * 1024
_ZERO_SECTOR = bytes(SECTOR)


def nonzero_runs(view: memoryview, n: int) -> list[tuple[int, int]]:
    """The runs [s, t) of sectors among the first `n` of `view` that hold a non-zero byte."""
    words = np.frombuffer(view, np.uint64, n * SECTOR // 8).reshape(n, SECTOR // 8)
    nonzero = words[:, 0] != 0  # most data: decided by each sector's first word
    unsure = ~nonzero
    if not unsure.any():
        return [(0, n)]
    if unsure.all():  # zeros, say: no copy of the rows to check
        nonzero = words.max(axis=1) != 0
    else:
        nonzero[unsure] = words[unsure].max(axis=1) != 0
    edges = np.flatnonzero(np.diff(nonzero, prepend=False, append=False)).tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))


class VolumeLike(Protocol):
    """What file contents need of the redundant volume."""

    capacity: int
    stripe_bytes: int

    def read(self, offset: int, length: int, caller_checks: bool = False) -> bytearray: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def parity_only_chunks(self, offset: int, length: int) -> list[tuple[int, int, int]]: ...


Sectors = dict[int, bytearray]
"""A dirty block: sector index within the block -> that sector's 4 KiB."""


def _sector_runs(indices) -> list[tuple[int, int]]:
    """Runs [a, b) of consecutive sector indices (given in any order)."""
    out: list[tuple[int, int]] = []
    for s in sorted(indices):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def _offsets(bufs: list) -> list[int]:
    """The sector at which each buffer starts, counting from the first."""
    out, at = [], 0
    for b in bufs:
        out.append(at)
        at += len(b) // SECTOR
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
        self.dirty: dict[int, dict[int, Sectors]] = {}
        self.dirty_bytes = 0  # SECTOR per dirty sector
        self.dirty_blocks = 0
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
            blocks = [b for b in dirty if b0 <= b <= b1]
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
            for s, sec in dirty[b].items():  # type: ignore[index]
                _copy(out, offset, end, b * BLOCK + s * SECTOR, sec)
        return out

    def _load_sector(self, ino: int, sector: int, size: int) -> bytearray:
        """A file sector's stored contents (zeros for a hole or past the end of file)."""
        exts = self.map.overlapping(ino, sector, sector) if sector * SECTOR < size else []
        if not exts:
            return bytearray(SECTOR)
        raw, at = self.map.read_run(ino, exts, sector, sector + 1)
        p = (sector - at) * SECTOR
        return bytearray(raw[p : p + SECTOR])

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
        full: list[tuple[int, memoryview]] = []
        part: list[tuple[int, Sectors]] = []
        fb0, fb1 = -(-offset // BLOCK), end // BLOCK  # the blocks the write covers whole
        if fb1 > fb0:
            for blk in [b for b in dirty if fb0 <= b < fb1]:
                self._forget_block(dirty, blk)
            full.append((fb0, view[fb0 * BLOCK - offset : fb1 * BLOCK - offset]))
        for blk in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            if fb0 <= blk < fb1:
                continue
            bs = blk * BLOCK
            lo, hi = max(offset, bs), min(end, bs + BLOCK)
            secs = dirty.get(blk)
            if secs is None:
                secs = dirty[blk] = {}
                self.dirty_blocks += 1
            for s in range((lo - bs) // SECTOR, (hi - bs - 1) // SECTOR + 1):
                ss = bs + s * SECTOR
                x, y = max(lo, ss), min(hi, ss + SECTOR)
                sec = secs.get(s)
                if sec is None:
                    self.dirty_bytes += SECTOR
                    if x == ss and y == ss + SECTOR:
                        secs[s] = bytearray(view[x - offset : y - offset])
                        continue
                    sec = secs[s] = self._load_sector(ino, ss // SECTOR, size)
                sec[x - ss : y - ss] = view[x - offset : y - offset]
            if hi == bs + BLOCK and sequential:
                part.append((blk, secs))
                self._forget_block(dirty, blk)
        self._seq_end[ino] = end
        if full or part:
            self.store(ino, new_size, full, part)
        if not dirty:
            del self.dirty[ino]
        if self.dirty_bytes > DIRTY_LIMIT:
            self.write_out_all(lambda i: new_size if i == ino else None)
        return new_size

    def _forget_block(self, dirty: dict[int, Sectors], blk: int) -> None:
        """Drop a block's dirty sectors (stored or superseded)."""
        secs = dirty.pop(blk, None)
        if secs is not None:
            self.dirty_blocks -= 1
            self.dirty_bytes -= SECTOR * len(secs)

    def _forget_file(self, ino: int) -> None:
        """Drop all of a file's dirty sectors (stored or deleted)."""
        dirty = self.dirty.pop(ino, None) or {}
        self.dirty_blocks -= len(dirty)
        self.dirty_bytes -= SECTOR * sum(len(secs) for secs in dirty.values())

    def store(self, ino: int, size: int, full: list[tuple[int, memoryview]],
              part: list[tuple[int, Sectors]]) -> None:
        """Put whole blocks (`full`: first block number, the bytes of one or more blocks) and
        dirty sectors (`part`) of a file of `size` bytes onto the volume and into the block
        map."""
        in_file = -(-size // SECTOR)
        cuts: list[tuple[int, int]] = []  # file sectors replaced
        pieces: list[list] = []  # runs of non-zero sectors: [first, count, buffers]
        for blk, view in full:  # whole blocks from one write: split only at groups and zeros
            first = blk * SECTORS_PER_BLOCK
            n = min(len(view) // SECTOR, in_file - first)
            if n <= 0:
                continue
            cuts.append((first, first + n))
            for s, t in nonzero_runs(view, n):
                while s < t:  # a piece ends at a group's end
                    end = min(t, (first + s) // GROUP_SECTORS * GROUP_SECTORS + GROUP_SECTORS
                              - first)
                    pieces.append([first + s, end - s, [view[s * SECTOR : end * SECTOR]]])
                    s = end
        for blk, secs in part:
            first = blk * SECTORS_PER_BLOCK
            for a, z in _sector_runs(s for s in secs if first + s < in_file):
                cuts.append((first + a, first + z))
                for s in range(a, z):
                    sec = secs[s]
                    if sec == _ZERO_SECTOR:
                        continue
                    last = pieces[-1] if pieces else None
                    if s and last is not None and last[0] + last[1] == first + s:
                        last[1] += 1
                        last[2].append(sec)
                    else:
                        pieces.append([first + s, 1, [sec]])
        if not cuts:
            return
        cuts.sort()
        pieces.sort(key=lambda p: p[0])
        exts = self.map.overlapping_spans(ino, _spans(cuts))
        delete, keep, freed = self.map.cut(ino, exts, cuts)
        new = self._write_pieces(ino, pieces)
        self.map.apply(ino, delete, keep + new)
        for addr, n in freed:
            self.alloc.hold(addr, n)
        delta = sum(e.nsect for e in new) - sum(n for _a, n in freed)
        if delta:
            self.db.change("UPDATE inodes SET sectors=sectors+? WHERE id=?", (delta, ino))

    def _write_pieces(self, ino: int, pieces: list[list]) -> list[Extent]:
        """Write runs of file sectors ([first sector, count, buffers]: one buffer for the run,
        or one per sector) to newly allocated volume sectors; returns their extents.

        Space is allocated block by block (as it was promised), so a run needs no free extent
        larger than a block, and a block goes into smaller free pieces when no free extent
        holds it; runs placed back to back go to the volume in one write, straight from a
        run's own buffer when it is the only one.
        """
        units: list[tuple[int, int, int]] = []  # (piece, first sector, count): within a block
        for p, (first, n, _bufs) in enumerate(pieces):
            at = first
            while at < first + n:
                stop = min(first + n, (at // SECTORS_PER_BLOCK + 1) * SECTORS_PER_BLOCK)
                units.append((p, at, stop - at))
                at = stop
        if not units:
            return []
        placed = self.alloc.allocate_split([u[2] for u in units])
        split: list[tuple[int, int, int]] = []
        starts: list[int] = []
        for (p, at, _n), pieces_of_unit in zip(units, placed, strict=True):
            for start, k in pieces_of_unit:  # several when free space is in fragments
                split.append((p, at, k))
                starts.append(start)
                at += k
        units = split
        out: list[Extent] = []
        i = 0
        while i < len(units):
            j = i + 1
            while j < len(units) and starts[j] == starts[j - 1] + units[j - 1][2]:
                j += 1
            run = [self._unit_bufs(pieces[p], at, n) for p, at, n in units[i:j]]
            p0 = units[i][0]
            if all(u[0] == p0 for u in units[i:j]) and len(pieces[p0][2]) == 1:
                first, _n, (buf,) = pieces[p0]  # one piece's own buffer: no copy
                a, b = units[i][1] - first, units[j - 1][1] + units[j - 1][2] - first
                data = buf[a * SECTOR : b * SECTOR]
            else:
                data = b"".join(x for bufs in run for x in bufs)
            self.volume.write(starts[i] * SECTOR, data)
            for (_p, at, n), start, bufs in zip(units[i:j], starts[i:j], run, strict=True):
                csums = b"".join(sector_checksums(x, ino, at + k)
                                 for x, k in zip(bufs, _offsets(bufs), strict=True))
                e = out[-1] if out else None
                if e is not None and e.end == at and e.addr + e.nsect == start \
                        and e.sector // GROUP_SECTORS == at // GROUP_SECTORS:
                    e.nsect += n  # one extent for what is back to back in file and volume
                    e.csums += csums  # type: ignore[operator]
                else:
                    out.append(Extent(at, n, start, csums, None))
            i = j
        return out

    @staticmethod
    def _unit_bufs(piece: list, at: int, n: int) -> list:
        """The buffers of file sectors [at, at + n) of a piece."""
        first, count, bufs = piece
        if len(bufs) == count:  # one buffer per sector
            return bufs[at - first : at - first + n]
        return [bufs[0][(at - first) * SECTOR : (at - first + n) * SECTOR]]

    def write_out(self, ino: int, size: int) -> None:
        """Store every dirty block of one file."""
        dirty = self.dirty.get(ino)
        if not dirty:
            self.dirty.pop(ino, None)
            return
        self.store(ino, size, [], sorted(dirty.items()))
        self._forget_file(ino)

    def write_out_all(self, size_of=None) -> None:
        """Store every dirty block of every file."""
        for ino in list(self.dirty):
            size = size_of(ino) if size_of is not None else None
            if size is None:
                size = self.db.value("SELECT size FROM inodes WHERE id=?", (ino,), 0)
            self.write_out(ino, size)

    # --- truncating and dropping --------------------------------------------------------------

    def tail_rewritten(self, ino: int, size: int, new_size: int) -> bool:
        """True if shrinking a file of `size` bytes to `new_size` rewrites its new last
        sector: one kept only in part that holds data (stored, or buffered)."""
        if new_size >= size or not new_size % SECTOR:
            return False
        sector = new_size // SECTOR
        blk, s = divmod(sector, SECTORS_PER_BLOCK)
        if s in self.dirty.get(ino, {}).get(blk, ()):
            return True
        return bool(self.map.overlapping(ino, sector, sector))

    def truncate(self, ino: int, size: int, new_size: int) -> None:
        """Change a file's length from `size` to `new_size` (the caller records the size)."""
        self._seq_end.pop(ino, None)
        if new_size >= size:
            return
        keep = -(-new_size // SECTOR)  # sectors that stay
        last = (keep - 1) // SECTORS_PER_BLOCK if keep else -1
        dirty = self.dirty.get(ino, {})
        for blk in [b for b in dirty if b > last]:
            self._forget_block(dirty, blk)
        secs = dirty.get(last)
        if secs is not None:
            for s in [s for s in secs if last * SECTORS_PER_BLOCK + s >= keep]:
                del secs[s]
                self.dirty_bytes -= SECTOR
        self._release(ino, self.map.truncate(ino, keep))
        tail = new_size % SECTOR
        if tail and self.tail_rewritten(ino, size, new_size):  # (a hole stays a hole)
            s = (keep - 1) % SECTORS_PER_BLOCK
            if secs is None:
                secs = dirty[last] = {}
                self.dirty_blocks += 1
                self.dirty[ino] = dirty
            sec = secs.get(s)
            if sec is None:
                sec = secs[s] = self._load_sector(ino, keep - 1, size)
                self.dirty_bytes += SECTOR
            sec[tail:] = bytes(SECTOR - tail)
        if secs is not None and not secs:
            self._forget_block(dirty, last)
        if not dirty:
            self.dirty.pop(ino, None)

    def punch(self, ino: int, size: int, offset: int, end: int) -> None:
        """Make bytes [offset, end) of a file of `size` bytes read as zeros: the whole sectors
        in it become holes (their space is freed at the next commit), the rest is overwritten
        with zeros. The caller has made room for the two edge sectors' blocks."""
        end = min(end, size)
        if offset >= end:
            return
        lo, hi = -(-offset // SECTOR), end // SECTOR  # the sectors the range covers whole
        if hi <= lo:
            self.write(ino, size, offset, bytes(end - offset))
            return
        if offset < lo * SECTOR:
            self.write(ino, size, offset, bytes(lo * SECTOR - offset))
        if end > hi * SECTOR:
            self.write(ino, size, hi * SECTOR, bytes(end - hi * SECTOR))
        self._seq_end.pop(ino, None)
        dirty = self.dirty.get(ino, {})
        b0, b1 = lo // SECTORS_PER_BLOCK, (hi - 1) // SECTORS_PER_BLOCK
        for blk in [b for b in dirty if b0 <= b <= b1]:
            secs = dirty[blk]
            first = blk * SECTORS_PER_BLOCK
            for s in [s for s in secs if lo <= first + s < hi]:
                del secs[s]
                self.dirty_bytes -= SECTOR
            if not secs:
                self._forget_block(dirty, blk)
        if not dirty:
            self.dirty.pop(ino, None)
        self._release(ino, self.map.punch(ino, lo, hi))

    def _release(self, ino: int, freed: list[tuple[int, int]]) -> None:
        """Hold a file's freed volume pieces until the next commit, and count them off."""
        if freed:
            for addr, n in freed:
                self.alloc.hold(addr, n)
            self.db.change("UPDATE inodes SET sectors=sectors-? WHERE id=?",
                           (sum(n for _a, n in freed), ino))

    def drop(self, ino: int, stored: bool = True) -> None:
        """Forget a deleted file's contents and free its sectors (`stored`: it has some)."""
        self._forget_file(ino)
        self._seq_end.pop(ino, None)
        if not stored:
            return
        for addr, nsect in self.map.truncate(ino, 0):
            self.alloc.hold(addr, nsect)

    def next_data(self, ino: int, sector: int) -> int | None:
        """The first file sector at or after `sector` holding data (stored or dirty), or
        None."""
        found = self.map.next_stored(ino, sector)
        for blk, secs in self.dirty.get(ino, {}).items():
            first = blk * SECTORS_PER_BLOCK
            for s in secs:
                if sector <= first + s and (found is None or first + s < found):
                    found = first + s
        return found

    def next_hole(self, ino: int, sector: int) -> int:
        """The first file sector at or after `sector` that holds no data (stored or dirty)."""
        dirty = {blk * SECTORS_PER_BLOCK + s for blk, secs in self.dirty.get(ino, {}).items()
                 for s in secs}
        while True:
            pos = self.map.next_unstored(ino, sector)
            while pos in dirty:
                pos += 1
            if pos == sector:
                return pos
            sector = pos

    def dirty_sectors(self, ino: int) -> int:
        """Sectors the file's unwritten blocks will take at most (for st_blocks)."""
        return sum(len(secs) for secs in self.dirty.get(ino, {}).values())
