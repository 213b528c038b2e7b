"""A ghost's source: what a ghost records of it, the checks its content must pass, and one
fetch's pieces while they are on their way to the volume.

Content moves in 1 MiB pieces, each checked against the source's size and mtime at import
and, once taken, its xxh3-64 hash before it is served or stored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import xxhash

from vfs.attrs import clamp_time
from vfs.errors import FSError

PIECE = 1 << 20
RECENT_PIECES = 32  # stored pieces of a fetch still kept in memory for readers (32 MiB)
AHEAD_PIECES = 8  # pieces readers ahead of a held-back fetch read from the source, kept
# A fetch keeps at most LEAD_PIECES ahead of a reader that follows it (one served within
# FOLLOW_SECONDS, whose last LEAD_PIECES came at FOLLOW_RATE or faster): what such a reader
# asks for is then still in memory. Read back from the volume instead, it would wait for the
# stores just queued there and then for the disk (300-450 MB/s measured). A slower reader
# (a player streaming a film, say) loses nothing by reading back, and does not hold the fetch.
LEAD_PIECES = 16
FOLLOW_SECONDS = 0.25
FOLLOW_RATE = 256 * PIECE  # bytes per second
# STORE_LATER: while such a reader follows, nothing is stored until the fetch has read its
# last piece: storing beside the reader took its share of the processor (a 256 MiB first read
# on two cores: 1.1-1.5 GB/s, and 0.4-0.7 in some runs, against 2.0-2.5 with the store
# after). Pieces wait in memory up to the fetch buffer; once it is full, the fetch is held
# back and the reader reads the rest from the source itself, so those pieces are read twice.


def piece_hash(data: bytes | bytearray | memoryview) -> int:
    """The content hash of one piece of a source file."""
    return xxhash.xxh3_64_intdigest(data)


def pack_hashes(hashes: list[int]) -> bytes:
    """Hashes as stored in the `ghosts` table."""
    return np.array(hashes, dtype="<u8").tobytes()


def unpack_hashes(blob: bytes | None) -> list[int] | None:
    """Hashes from the `ghosts` table (None: not taken yet)."""
    if blob is None:
        return None
    return [int(h) for h in np.frombuffer(bytes(blob), dtype="<u8")]


@dataclass(slots=True)
class Record:
    """What a ghost knows of its source."""

    ino: int
    source: str
    size: int
    mtime_ns: int
    hashes: list[int] | None
    state: str


class SourceChanged(FSError):
    """A ghost's source is gone, unreadable, or no longer what was imported."""

    def __init__(self, rec: Record, why: str) -> None:
        super().__init__(errno.EIO, f"ghost inode {rec.ino}: source {rec.source} {why}")


def recorded_mtime(st: os.stat_result) -> int:
    """A source's modification time as a ghost records it (clamped to the range stored)."""
    return clamp_time(st.st_mtime_ns)


def check_source(rec: Record, st: os.stat_result) -> None:
    """Refuse a source whose size or mtime differ from the record."""
    if not stat.S_ISREG(st.st_mode):
        raise SourceChanged(rec, "is no longer a regular file")
    if st.st_size != rec.size:
        raise SourceChanged(rec, f"changed size ({rec.size} -> {st.st_size} bytes)")
    if recorded_mtime(st) != rec.mtime_ns:
        raise SourceChanged(rec, "changed (its modification time differs)")


def _checked_piece(rec: Record, fd: int, offset: int) -> tuple[bytes, int]:
    """The piece of an open source at `offset` (a multiple of PIECE) and its hash, checked
    against the record's size, mtime and, when known, hash."""
    n = min(PIECE, rec.size - offset)
    piece = os.pread(fd, n, offset)
    if len(piece) != n:
        raise SourceChanged(rec, f"is shorter than {rec.size} bytes now")
    h = piece_hash(piece)
    k = offset // PIECE
    if rec.hashes is not None and (k >= len(rec.hashes) or rec.hashes[k] != h):
        raise SourceChanged(rec, f"has different content at byte {offset}")
    check_source(rec, os.fstat(fd))
    return piece, h


@contextlib.contextmanager
def _opened_source(rec: Record) -> Iterator[int]:
    """A source opened for reading and checked against its record; OSErrors while it is open
    become SourceChanged."""
    try:
        fd = os.open(rec.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceChanged(rec, f"cannot be opened: {exc.strerror}") from exc
    try:
        check_source(rec, os.fstat(fd))
        yield fd
    except FSError:
        raise
    except OSError as exc:
        raise SourceChanged(rec, f"cannot be read: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read_pieces(rec: Record, stop: threading.Event | None = None):
    """Yield (offset, piece, hash) of a source, each checked against the record."""
    with _opened_source(rec) as fd:
        for offset in range(0, rec.size, PIECE):
            if stop is not None and stop.is_set():
                raise FSError(errno.EIO, f"ghost inode {rec.ino}: fetch stopped (unmounting)")
            piece, h = _checked_piece(rec, fd, offset)
            yield offset, piece, h


def read_piece(rec: Record, offset: int) -> bytes:
    """One checked piece of a source, the one starting at `offset` (a multiple of PIECE)."""
    with _opened_source(rec) as fd:
        return _checked_piece(rec, fd, offset)[0]


def read_range(rec: Record, offset: int, length: int, held: Callable[[int], bytes | None],
               keep: Callable[[int, bytes], None]) -> bytes:
    """Bytes offset..offset+length (clipped to the file) of a ghost, from the pieces `held`
    returns by their offset; each other piece is read from the source, checked, and given to
    `keep`."""
    end = min(offset + length, rec.size)
    parts = []
    for start in range(offset - offset % PIECE, end, PIECE):
        piece = held(start)
        if piece is None:
            piece = read_piece(rec, start)
            keep(start, piece)
        parts.append(memoryview(piece)[max(offset - start, 0):end - start])
    return b"".join(parts)


def keep_last(pieces: dict, key: object, piece: bytes, limit: int) -> None:
    """Add `piece` to `pieces`, dropping the oldest beyond `limit`."""
    pieces[key] = piece
    while len(pieces) > limit:
        del pieces[next(iter(pieces))]


def source_hashes(rec: Record, stop: threading.Event | None = None) -> list[int]:
    """The piece hashes of a source that still matches its record's size and mtime."""
    return [h for _o, _p, h in read_pieces(rec, stop)]


@dataclass
class Fetch:
    """One hydration in progress; readers wait on it for the bytes they need."""

    rec: Record
    arrived: int = 0
    error: FSError | None = None
    done: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    # the latest verified pieces by offset: readers close behind the fetch are served from
    # memory instead of reading back what is still on its way to the volume
    recent: dict[int, bytes] = field(default_factory=dict)
    stored_to: int = 0
    store_error: FSError | None = None
    # True while the fetch waits for room to store: a reader beyond what has arrived then
    # reads its pieces from the source itself (kept in `ahead`) instead of waiting for the volume
    held_back: bool = False
    ahead: dict[int, bytes] = field(default_factory=dict)
    read_to: int = 0  # the furthest byte served to a reader
    read_at: float = 0.0  # when (time.monotonic) a reader was last served
    follow_seconds: float = FOLLOW_SECONDS
    follow_rate: float = FOLLOW_RATE
    fast: bool = True  # whether the reader's last LEAD_PIECES came at follow_rate or faster
    _rate_from: int = 0  # where and when (time.monotonic) that measurement started
    _rate_since: float = field(default_factory=time.monotonic)
    wanted: int = 0  # the furthest byte a reader has waited for

    def covers(self, offset: int, length: int) -> bool:
        """True if bytes offset..offset+length (clipped to the file) have arrived."""
        return self.arrived >= min(offset + length, self.rec.size)

    def arrive(self, offset: int, piece: bytes) -> None:
        """A checked piece is here (held until stored): wake the readers waiting for it."""
        with self.cond:
            self.recent[offset] = piece
            self.arrived = offset + len(piece)
            self.cond.notify_all()

    def stored(self, offset: int) -> None:
        """The piece at `offset` is on the volume; stored pieces beyond the latest
        RECENT_PIECES need not be held any longer."""
        with self.cond:
            self.stored_to = offset + PIECE
            while len(self.recent) > RECENT_PIECES:
                first = next(iter(self.recent))
                if first >= self.stored_to:
                    break
                del self.recent[first]

    def from_memory(self, offset: int, length: int) -> bytes | None:
        """Bytes offset..offset+length (clipped) if every piece they need is still held."""
        end = min(offset + length, self.rec.size)
        if offset >= end:
            return b""
        parts = []
        with self.cond:
            for start in range(offset - offset % PIECE, end, PIECE):
                piece = self.recent.get(start)
                if piece is None:
                    return None
                parts.append(memoryview(piece)[max(offset - start, 0):end - start])
            self._served(end)
        return b"".join(parts)

    def _served(self, end: int) -> None:
        """A reader got the bytes up to `end` (under `cond`): a fetch keeping pace goes on."""
        now = time.monotonic()
        self.read_to = max(self.read_to, end)
        self.read_at = now
        span = self.read_to - self._rate_from
        if span >= LEAD_PIECES * PIECE:
            self.fast = span >= self.follow_rate * (now - self._rate_since)
            self._rate_from, self._rate_since = self.read_to, now
        self.cond.notify_all()

    def keep_pace(self, offset: int, lead: int = LEAD_PIECES * PIECE) -> None:
        """Wait while a reader follows this fetch and `offset` is `lead` bytes or more beyond
        what it was served (see LEAD_PIECES), unless that reader is slow or another one has
        waited for pieces beyond `offset`; the fetch's next piece starts at `offset`."""
        with self.cond:
            self._wait_followed(lambda: offset - self.read_to >= lead and offset >= self.wanted)

    def defer_store(self) -> None:
        """Wait while a fast reader follows this fetch and the fetch has pieces still to read
        (see STORE_LATER)."""
        with self.cond:
            self._wait_followed(lambda: self.arrived < self.rec.size and not self.done)

    def _wait_followed(self, more: Callable[[], bool]) -> None:
        """Wait (under `cond`) while `more()` holds, the fetch has not failed and a fast reader
        follows it: one served within `follow_seconds`."""
        while more() and not self.error and self.fast:
            left = self.follow_seconds - (time.monotonic() - self.read_at)
            if left <= 0:
                return
            self.cond.wait(left)

    def hold_back(self, held: bool) -> None:
        """The fetch waits (or no longer waits) for room to store: wake the waiting readers."""
        with self.cond:
            self.held_back = held
            self.cond.notify_all()

    def read_ahead(self, offset: int, length: int) -> bytes:
        """Bytes offset..offset+length (clipped) from the pieces held, reading the others from
        the source, each checked as the fetch checks them."""

        def held(start: int) -> bytes | None:
            with self.cond:
                return self.recent.get(start) or self.ahead.get(start)

        def keep(start: int, piece: bytes) -> None:
            with self.cond:
                keep_last(self.ahead, start, piece, AHEAD_PIECES)

        data = read_range(self.rec, offset, length, held, keep)
        with self.cond:
            self._served(min(offset + length, self.rec.size))
        return data

    def wait_done(self) -> None:
        """Block until the fetch has ended (every piece stored, or failed)."""
        with self.cond:
            while not self.done:
                self.cond.wait()

    def wait(self, offset: int, length: int) -> None:
        """Block until the range has arrived, the fetch is held back or it has ended."""
        with self.cond:
            # a fetch keeping pace with another reader goes on at least this far
            self.wanted = max(self.wanted, min(offset + length, self.rec.size))
            self.read_at = time.monotonic()  # a reader waiting for it follows the fetch
            self.cond.notify_all()
            while not (self.done or self.error or self.covers(offset, length)
                       or self.held_back):
                self.cond.wait()
