"""The block map: where each stored 4 KiB sector of a file lives on the volume, and its checksum.

A file's stored contents are extents: runs of consecutive file sectors kept in consecutive
volume sectors. An extent never crosses a group boundary (GROUP_SECTORS sectors, 1 MiB), so
rows stay bounded and a lookup knows how far back to search. Every sector has its own xxh3
checksum, seeded with the inode and the file sector, so a write of one sector replaces just
that sector (no read of its neighbours) and a read checks only the sectors it returns.
File sectors in no extent are holes (zeros). A file's extents never overlap.

Format-2 databases kept whole 64 KiB blocks with one checksum each; those rows become extents
with a row checksum (`row_csum`) instead of sector checksums. Such a row is read and checked
whole, and gets sector checksums the first time a change splits it.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from raid.xxh3 import xxh3_64_each
from vfs.alloc import SECTOR
from vfs.errors import FSError
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

GROUP_SECTORS = 256
GROUP = GROUP_SECTORS * SECTOR
FORMAT2_BLOCK_SECTORS = 16  # a format-2 row: one 64 KiB block
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_CSUM = 8  # bytes per sector checksum
_hash = xxhash.xxh3_64_intdigest


def _seed(ino: int, n: int) -> int:
    return (ino * _GOLDEN + n) & _MASK64


def sector_checksums(data: bytes | bytearray | memoryview, ino: int, first: int) -> bytes:
    """Packed checksums of the whole sectors in `data`, which starts at file sector `first`."""
    return xxh3_64_each(data, SECTOR, ino * _GOLDEN + first).astype("<u8", copy=False).tobytes()


def block_checksum(data: bytes | bytearray | memoryview, ino: int, blkno: int) -> int:
    """A format-2 block's checksum: its bytes, tied to its inode and 64 KiB block number."""
    return _hash(data, seed=_seed(ino, blkno)) & _MASK63


@dataclass(slots=True)
class Extent:
    """One block-map row: file sectors [sector, sector + nsect) at volume sector `addr`."""

    sector: int
    nsect: int
    addr: int
    csums: bytes | None  # nsect packed sector checksums, or None for a format-2 row
    row_csum: int | None  # a format-2 row's checksum over all its sectors

    @property
    def end(self) -> int:
        """The file sector after the extent."""
        return self.sector + self.nsect

    def part(self, lo: int, hi: int) -> Extent:
        """The extent's sectors [lo, hi) as an extent of their own (sector checksums only)."""
        assert self.csums is not None
        a, b = lo - self.sector, hi - self.sector
        return Extent(lo, hi - lo, self.addr + a, self.csums[a * _CSUM : b * _CSUM], None)


class ExtentMap:
    """Block-map rows of the metadata database: lookups, checked reads, inserts and punches."""

    def __init__(self, db: MetaDB, volume) -> None:
        self.db = db
        self.volume = volume

    def overlapping(self, ino: int, s0: int, s1: int) -> list[Extent]:
        """The extents holding any of file sectors s0..s1 (inclusive), in file order."""
        return [Extent(*r) for r in self.db.rows(
            "SELECT sector, nsect, addr, csums, row_csum FROM extents "
            "WHERE inode=? AND sector BETWEEN ? AND ? AND sector + nsect > ? ORDER BY sector",
            (ino, s0 - GROUP_SECTORS + 1, s1, s0))]

    def overlapping_spans(self, ino: int, spans: list[tuple[int, int]]) -> list[Extent]:
        """The extents holding any sector of the sorted sector ranges [lo, hi) in `spans`, which
        lie at least a group apart, in file order (one statement for them all)."""
        if len(spans) == 1:
            return self.overlapping(ino, spans[0][0], spans[0][1] - 1)
        return [Extent(*r) for r in self.db.rows(
            "SELECT e.sector, e.nsect, e.addr, e.csums, e.row_csum "
            "FROM json_each(?) j CROSS JOIN extents e ON e.inode = ? "
            "AND e.sector BETWEEN j.value->>0 - ? AND j.value->>1 - 1 "
            "AND e.sector + e.nsect > j.value->>0", (json.dumps(spans), ino, GROUP_SECTORS - 1))]

    # --- checked reads --------------------------------------------------------------------

    def read_run(self, ino: int, run: list[Extent], lo: int, hi: int) -> tuple[memoryview, int]:
        """File sectors [lo, hi) held by `run` (extents back to back on file and volume),
        checked against their checksums; returns the bytes and the file sector they start at.

        A format-2 row in the run is read and checked whole, so the bytes may start earlier
        and end later than asked.
        """
        first, last = run[0], run[-1]
        lo, hi = max(lo, first.sector), min(hi, last.end)
        if first.csums is None:
            lo = first.sector
        if last.csums is None:
            hi = last.end
        at, n = (first.addr + lo - first.sector) * SECTOR, (hi - lo) * SECTOR
        # The volume may read a small range alone, without the checksum of the chunk it lies
        # in: these checks stand in for it. Bytes that fail them are read again through the
        # volume's checked path, which reconstructs and repairs a damaged chunk.
        raw = memoryview(self.volume.read(at, n, caller_checks=True))
        bad = self._first_bad(ino, run, lo, hi, raw)
        if bad is not None:
            log.debug("inode %d sectors %d-%d: checksum mismatch; reading them again through "
                      "the volume's checks", ino, lo, hi - 1)
            raw = memoryview(self.volume.read(at, n))
            bad = self._first_bad(ino, run, lo, hi, raw)
            if bad is not None:
                self._mismatch(ino, *bad)
        return raw, lo

    @staticmethod
    def _first_bad(ino: int, run: list[Extent], lo: int, hi: int, raw: memoryview
                   ) -> tuple[list[Extent], int, memoryview] | None:
        """None if `raw` (file sectors [lo, hi) of `run`) matches its checksums; otherwise the
        failing extents, their first file sector and their bytes (for `_mismatch`)."""
        if all(e.csums is not None for e in run):
            want = b"".join(e.csums[(max(lo, e.sector) - e.sector) * _CSUM:  # type: ignore[index]
                                    (min(hi, e.end) - e.sector) * _CSUM] for e in run)
            return None if sector_checksums(raw, ino, lo) == want else (run, lo, raw)
        for e in run:
            a, b = max(lo, e.sector), min(hi, e.end)
            piece = raw[(a - lo) * SECTOR : (b - lo) * SECTOR]
            if e.csums is None:
                ok = block_checksum(piece, ino, e.sector // FORMAT2_BLOCK_SECTORS) == e.row_csum
            else:
                ok = sector_checksums(piece, ino, a) == e.csums[(a - e.sector) * _CSUM:
                                                                (b - e.sector) * _CSUM]
            if not ok:
                return [e], a, piece
        return None

    @staticmethod
    def _mismatch(ino: int, run: list[Extent], lo: int, raw: memoryview) -> None:
        """Raise EIO naming the first sector of `raw` (file sector `lo`) that fails its check."""
        for e in run:
            a = max(lo, e.sector)
            for s in range(a, e.end):
                p = (s - lo) * SECTOR
                if p >= len(raw):
                    break
                if e.csums is None:
                    bad = True
                else:
                    k = (s - e.sector) * _CSUM
                    bad = sector_checksums(raw[p : p + SECTOR], ino, s) != e.csums[k : k + _CSUM]
                if bad:
                    log.error("inode %d sector %d (volume sector %d): checksum mismatch; the "
                              "volume does not hold what was written there",
                              ino, s, e.addr + s - e.sector)
                    raise FSError(errno.EIO, f"inode {ino} sector {s}: checksum mismatch")
        raise FSError(errno.EIO, f"inode {ino} sectors from {lo}: checksum mismatch")

    def with_sector_checksums(self, ino: int, e: Extent) -> Extent:
        """`e` with sector checksums: a format-2 row is read, checked and checksummed."""
        if e.csums is not None:
            return e
        raw, _ = self.read_run(ino, [e], e.sector, e.end)
        return Extent(e.sector, e.nsect, e.addr, sector_checksums(raw, ino, e.sector), None)

    # --- changes ----------------------------------------------------------------------------

    def cut(self, ino: int, exts: list[Extent], ranges: list[tuple[int, int]]
            ) -> tuple[list[int], list[Extent], list[tuple[int, int]]]:
        """Plan removing file sectors in `ranges` ([lo, hi), sorted, disjoint) from `exts`
        (the sorted extents overlapping them): returns the rows to delete (by first sector),
        the remainders to insert, and the freed (addr, nsect) pieces of the volume."""
        delete: list[int] = []
        keep: list[Extent] = []
        freed: list[tuple[int, int]] = []
        i = 0
        for e in exts:
            while i < len(ranges) and ranges[i][1] <= e.sector:
                i += 1
            j = i
            pieces: list[tuple[int, int]] = []  # the parts of e that stay
            pos = e.sector
            while j < len(ranges) and ranges[j][0] < e.end:
                lo, hi = max(ranges[j][0], e.sector), min(ranges[j][1], e.end)
                if lo > pos:
                    pieces.append((pos, lo))
                freed.append((e.addr + lo - e.sector, hi - lo))
                pos = hi
                j += 1
            if pos == e.sector:
                continue  # untouched
            if pos < e.end:
                pieces.append((pos, e.end))
            delete.append(e.sector)
            if pieces:
                full = self.with_sector_checksums(ino, e)
                keep.extend(full.part(a, b) for a, b in pieces)
        return delete, keep, freed

    def apply(self, ino: int, delete: Iterable[int], insert: Iterable[Extent]) -> None:
        """Delete rows by first sector, then insert extents (with sector checksums)."""
        self.db.changemany("DELETE FROM extents WHERE inode=? AND sector=?",
                           [(ino, s) for s in delete])
        self.db.changemany(
            "INSERT INTO extents (inode, sector, nsect, addr, csums) VALUES (?, ?, ?, ?, ?)",
            [(ino, e.sector, e.nsect, e.addr, e.csums) for e in insert])

    def punch(self, ino: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Remove file sectors [lo, hi) (they become holes); returns the freed (addr, nsect)
        pieces of the volume."""
        delete, keep, freed = self.cut(ino, self.overlapping(ino, lo, hi - 1), [(lo, hi)])
        self.apply(ino, delete, keep)
        return freed

    def next_stored(self, ino: int, lo: int) -> int | None:
        """The first stored file sector at or after `lo`, or None."""
        return self.db.value(
            "SELECT max(sector, ?) FROM extents WHERE inode=? AND sector >= ? "
            "AND sector + nsect > ? ORDER BY sector LIMIT 1",
            (lo, ino, lo - GROUP_SECTORS + 1, lo))

    def next_unstored(self, ino: int, lo: int) -> int:
        """The first file sector at or after `lo` that is a hole."""
        pos = lo
        for sector, nsect in self.db.rows(
                "SELECT sector, nsect FROM extents WHERE inode=? AND sector >= ? "
                "AND sector + nsect > ? ORDER BY sector", (ino, lo - GROUP_SECTORS + 1, lo)):
            if sector > pos:
                break
            pos = sector + nsect
        return pos

    def stored_in(self, ino: int, lo: int, hi: int) -> int:
        """How many of file sectors [lo, hi) are stored (not holes)."""
        return self.db.value(
            "SELECT total(min(sector + nsect, ?) - max(sector, ?)) FROM extents "
            "WHERE inode=? AND sector BETWEEN ? AND ? AND sector + nsect > ?",
            (hi, lo, ino, lo - GROUP_SECTORS + 1, hi - 1, lo), 0)

    def truncate(self, ino: int, first: int) -> list[tuple[int, int]]:
        """Remove every sector of a file from `first` on; returns the freed (addr, nsect)
        pieces of the volume."""
        straddling = [e for e in self.overlapping(ino, first, first) if e.sector < first]
        delete, keep, freed = self.cut(ino, straddling, [(first, first + GROUP_SECTORS)])
        self.apply(ino, delete, keep)
        gone = list(self.db.rows(
            "SELECT addr, nsect FROM extents WHERE inode=? AND sector>=?", (ino, first)))
        if gone:
            self.db.change("DELETE FROM extents WHERE inode=? AND sector>=?", (ino, first))
        return freed + gone
