"""Read-ahead of a volume: hints to its members, and spans read into buffers of its own, past
the host's page cache.

Every read first hints (`Member.prefetch`) each chunk it needs that no span covers, and, when
reads are sequential, the next HINT_BYTES, so that members read in parallel.

Up to STREAMS sequential readers are followed at once (two files copied together, say): a read
continues the stream whose last read ended nearest before it, within HINT_BYTES (or just after
it, within STREAK_SLACK), or starts a new one. While a stream reads sequentially (STREAK_BYTES
back to back), the spans that follow it (SPAN_BYTES of the volume each, DEPTH of them,
LONG_DEPTH once the stream is long; with several sequential streams, at most an equal share
of SPANS_BUDGET each, at least one) are
also read from the members in background threads, straight into one aligned buffer per span
(`Member.readinto_uncached`: O_DIRECT on block files). A read that finished spans cover is
answered with a view of their buffers, without touching a member. Its chunks are checked
against the chunk checksums as it takes them, once per chunk, unless the reader checks the
bytes itself (`caller_checks`, as the filesystem does with its sector checksums): a reader
whose own check fails reads again without it, and then a chunk that fails is left to the
ordinary read. Checking every chunk as it arrived, in the background threads, hashed each
byte twice on the way to a filesystem reader, and the processor is what limits a cold read.

Planning a span (which chunks, on which members, with which checksums) happens under the
volume lock, like any read; the reading itself does not take the lock. A write to the volume
drops the spans it overlaps (`invalidate`, under the lock). A span serves only if every chunk
in it was read cleanly, and a chunk only once it matched its checksum (or its reader checks
it); anything else, from a member that does not hold its chunk to a failed read or a chunk
that fails its checksum, is left to the volume's ordinary read, which reconstructs, repairs
and counts.

Why: filling the host's page cache with member data (a page allocated, zeroed and accounted
for every 4 KiB) cost the daemon more CPU than the rest of a read, and the FUSE mount caches
the same bytes again above.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from backends.member import Member, MemberIOError
from backends.vectored import aligned_empty
from raid.checksums import UNWRITTEN, chunk_checksum
from raid.pools import SharedPool

if TYPE_CHECKING:
    from raid.volume import Volume

log = logging.getLogger(__name__)

HINT_BYTES = 8 * 1024 * 1024  # how far ahead of a sequential reader members get hints
SPAN_BYTES = 8 * 1024 * 1024  # volume bytes read ahead as one piece (rounded to stripes)
DEPTH = 4  # spans kept ahead of a sequential reader
# Spans kept ahead of a reader that has read LONG_STREAK back to back: a long stream gains from
# more member reads in flight (cold 1 GiB reads of raidz2 x 5 block files, A/B in turns: median
# 1,201 -> 1,306 MB/s), while a file of a few MiB read whole does not start reading that far
# past its end.
LONG_DEPTH = 10
LONG_STREAK = 64 * 1024 * 1024
THREADS = 16  # member reads at once
# Spans are read only for a reader that has read this much back to back, each read starting
# within STREAK_SLACK of where the one before ended: random reads that happen to land near
# each other must not start reading many megabytes ahead.
STREAK_BYTES = 2 * 1024 * 1024
STREAK_SLACK = 256 * 1024

STREAMS = 16  # sequential readers of one volume followed at once
# Spans planned ahead of all sequential streams together when there are several: each gets an
# equal share, at least one (16 readers: 8 MiB ahead of each, 128 MiB in all).
SPANS_BUDGET = 16
STREAM_IDLE = 2.0  # seconds after which a reader that stopped is no longer followed

# One pool for every volume in the process.
_pool = SharedPool(THREADS, "read-ahead")


def row_runs(pieces: Sequence[tuple]) -> Iterator[tuple[int, int]]:
    """Index ranges [i, j) of `pieces` (each starting with a row number, in order) whose rows
    follow one another: what one vectored read of a member takes."""
    i = 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and pieces[j][0] == pieces[j - 1][0] + 1:
            j += 1
        yield i, j
        i = j


# (row, view of the span's buffer)
_Piece = tuple[int, np.ndarray]


class _Span:
    """Volume bytes [start, end) being read, or read, into `data`, and the checksums its
    chunks must match."""

    __slots__ = ("start", "end", "data", "done", "chunks")

    def __init__(self, start: int, end: int, data: np.ndarray,
                 chunks: dict[int, tuple[int, int, int]]) -> None:
        self.start = start
        self.end = end
        self.data = data
        self.done: list[Future[bool]] = []  # one per member read from
        # Chunks not yet checked: offset in `data` -> (slot, row, checksum); unwritten chunks,
        # zeros by definition, are not here.
        self.chunks = chunks

    def ready(self) -> bool:
        """Wait for the span's reading; True if it holds the volume's bytes."""
        try:
            return all([f.result() for f in self.done])
        except Exception:  # noqa: BLE001 - a bug in read-ahead must not fail the read itself
            log.exception("read-ahead of [%d, %d) failed; the reader reads it itself",
                          self.start, self.end)
            return False


class _Stream:
    """One sequential reader being followed: where its last read ended, how far ahead its
    members were hinted, how many bytes it has read back to back, and the spans it keeps."""

    __slots__ = ("last_end", "hinted_until", "streak", "used", "window")

    def __init__(self) -> None:
        self.last_end = -1
        self.hinted_until = 0
        self.streak = 0  # bytes read back to back (give or take STREAK_SLACK) so far
        self.used = 0.0  # time.monotonic() of its last read
        self.window = (0, -1)  # span indices [lo, hi] it plans and keeps (none yet)


class ReadAhead:
    """What is read ahead of one volume's reader: member hints and spans."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        g = volume.geometry
        self.span_bytes = max(1, SPAN_BYTES // g.stripe_bytes) * g.stripe_bytes
        self._spans: dict[int, _Span] = {}  # by index (start // span_bytes)
        self._lock = threading.Lock()  # guards _spans: readers do not hold the volume lock
        self._closed = False
        self._streams: list[_Stream] = []  # the readers being followed (at most STREAMS)

    # --- the reader's side (no volume lock) ---------------------------------------------------

    def take(self, offset: int, length: int, caller_checks: bool = False) -> np.ndarray | None:
        """The volume's bytes [offset, offset + length) if spans read ahead hold all of them
        (and, unless `caller_checks`, their chunks match their checksums); None otherwise."""
        if not self._spans or length <= 0:
            return None
        sb = self.span_bytes
        first, last = offset // sb, (offset + length - 1) // sb
        with self._lock:
            spans = [self._spans.get(i) for i in range(first, last + 1)]
        parts = []
        for span in spans:
            if span is None or not span.ready():
                return None
            lo, hi = max(offset, span.start), min(offset + length, span.end)
            if not caller_checks and not self._chunks_match(span, lo, hi):
                return None
            parts.append(span.data[lo - span.start : hi - span.start])
        for span in spans:
            if offset + length >= span.end:
                self._forget(span)  # the reader is past it
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _forget(self, span: _Span) -> None:
        """Drop `span` unless another has taken its place meanwhile."""
        i = span.start // self.span_bytes
        with self._lock:
            if self._spans.get(i) is span:
                del self._spans[i]

    def _chunks_match(self, span: _Span, lo: int, hi: int) -> bool:
        """Check the chunks of `span` holding volume bytes [lo, hi) not checked before; on a
        mismatch, forget the span (the ordinary read repairs the chunk) and return False."""
        chunk = self.volume.geometry.chunk
        a = (lo - span.start) // chunk * chunk
        for at in range(a, hi - span.start, chunk):
            want = span.chunks.get(at)
            if want is None:
                continue
            slot, row, entry = want
            if chunk_checksum(span.data[at : at + chunk], slot, row) != entry:
                log.debug("slot %d row %d: read-ahead chunk fails its checksum; the reader "
                          "reads it itself", slot, row)
                self._forget(span)
                return False
            span.chunks.pop(at, None)  # checked (two readers may check it at once: harmless)
        return True

    def covers(self, offset: int) -> bool:
        """Whether a span is being read, or was read, for the byte at `offset`."""
        return offset // self.span_bytes in self._spans

    # --- the volume's side (under its lock) ---------------------------------------------------

    def follow(self, offset: int, length: int, hint_own: bool = True) -> None:
        """A read of [offset, offset + length) is under way: hint what it and, if it goes on
        a sequential stream, the next HINT_BYTES need, and plan spans. `hint_own=False`: the
        read fetches its own few bytes at once, so they are hinted only as part of a
        sequential stream (a hint would have the host read their whole chunks)."""
        end = offset + length
        start = offset
        stream = self._stream_of(offset)
        near = stream is not None
        if stream is None:
            stream = self._new_stream()
        stream.used = time.monotonic()
        # Sequential, give or take reordering (the kernel sends several readahead requests at
        # once, and worker threads may take them out of order).
        if abs(offset - stream.last_end) <= STREAK_SLACK:
            stream.streak += length
        else:
            stream.streak = length
        if near:
            if stream.streak >= STREAK_BYTES:
                self.advance(end, stream)
            end = min(self.volume.capacity, end + HINT_BYTES)
            if start < stream.hinted_until <= end:
                start = stream.hinted_until
            stream.last_end = max(stream.last_end, offset + length)
        else:
            stream.last_end = offset + length
            stream.hinted_until = 0
            if not hint_own:
                return
        if start >= end or (near and end <= stream.hinted_until):
            return
        stream.hinted_until = max(stream.hinted_until, end)
        self._hint(start, end)

    def _stream_of(self, offset: int) -> _Stream | None:
        """The stream a read at `offset` continues: its last read ended at most HINT_BYTES
        before `offset`, or STREAK_SLACK after it (requests taken out of order); the nearest
        if several do. None for a read that starts a new one (one trailing a stream from
        further behind is a reader of its own)."""
        best, best_gap = None, 0
        for s in self._streams:
            gap = offset - s.last_end
            if -STREAK_SLACK <= gap <= HINT_BYTES and (best is None or abs(gap) < best_gap):
                best, best_gap = s, abs(gap)
        return best

    def _new_stream(self) -> _Stream:
        """Follow a new reader, forgetting (to stay within STREAMS) those idle for STREAM_IDLE
        seconds, then the least recently used of those that are not reading sequentially, and
        only then sequential ones: random reads beside a stream do not push it out."""
        now = time.monotonic()
        self._streams = [s for s in self._streams if now - s.used < STREAM_IDLE]
        self._streams.sort(key=lambda s: (s.streak >= STREAK_BYTES, s.used))
        del self._streams[: max(0, len(self._streams) - STREAMS + 1)]
        stream = _Stream()
        self._streams.append(stream)
        return stream

    def advance(self, position: int, stream: _Stream) -> None:
        """A sequential reader got to `position`: plan the DEPTH (LONG_DEPTH, for a long
        stream) spans from the next span boundary on; with several sequential streams at
        once, at most an equal share of SPANS_BUDGET each (at least one), so that what is
        held in memory stays bounded."""
        sb = self.span_bytes
        capacity = self.volume.capacity
        first = -(-position // sb)
        if self._closed or first * sb >= capacity:
            return
        depth = LONG_DEPTH if stream.streak >= LONG_STREAK else DEPTH
        sequential = sum(1 for s in self._streams if s.streak >= STREAK_BYTES)
        if sequential > 1:
            depth = max(1, min(depth, SPANS_BUDGET // sequential))
        window = (first - 1, first + depth)
        last = min(first + depth, -(-capacity // sb))
        if window == stream.window and all(i in self._spans for i in range(first, last)):
            return  # as planned at this stream's last read (most reads stay within a span)
        stream.window = window
        windows = [s.window for s in self._streams]
        with self._lock:
            for i in list(self._spans):
                if not any(lo <= i <= hi for lo, hi in windows):
                    del self._spans[i]  # left behind by a reader that moved on
        for i in range(first, first + depth):
            if i * sb >= capacity:
                break
            if i not in self._spans:
                self._plan(i)

    def _hint(self, start: int, end: int) -> None:
        """Hint the members' chunks of volume bytes [start, end) that no span covers."""
        v = self.volume
        g = v.geometry
        sb, chunk = g.stripe_bytes, g.chunk
        runs: dict[int, list[int]] = {}
        for stripe in range(start // sb, (end - 1) // sb + 1):
            if self.covers(stripe * sb):
                continue
            group, row = g.locate(stripe)
            slots = g.column_slots(group, row)
            lo = max(start, stripe * sb) - stripe * sb
            hi = min(end, (stripe + 1) * sb) - stripe * sb
            for c in range(lo // chunk, (hi - 1) // chunk + 1):
                slot = slots[c]
                if v.slots[slot].holds(row):
                    run = runs.setdefault(slot, [])
                    if run and run[-1] >= row - 1:
                        run[-1] = max(run[-1], row)
                    else:
                        run.extend((row, row))
        for slot, run in runs.items():
            member = v.slots[slot].member
            for i in range(0, len(run), 2):
                member.prefetch(g.chunk_offset(run[i]), (run[i + 1] - run[i] + 1) * chunk)

    def invalidate(self, offset: int, length: int) -> None:
        """Forget what was read ahead of volume bytes [offset, offset + length) (they are
        being written)."""
        if not self._spans or length <= 0:
            return
        sb = self.span_bytes
        with self._lock:
            for i in range(offset // sb, (offset + length - 1) // sb + 1):
                self._spans.pop(i, None)

    def _plan(self, index: int) -> None:
        v = self.volume
        g = v.geometry
        sb, chunk = g.stripe_bytes, g.chunk
        start = index * self.span_bytes
        end = min(v.capacity, start + self.span_bytes)
        if v.pending_stripes(start // sb, (end - 1) // sb):
            return  # data still in the stripe cache: the ordinary read commits it
        data = aligned_empty(end - start)
        pieces: dict[int, list[_Piece]] = {}  # by slot
        chunks: dict[int, tuple[int, int, int]] = {}
        for stripe in range(start // sb, (end - 1) // sb + 1):
            group, row = g.locate(stripe)
            slots = g.column_slots(group, row)
            base = stripe * sb - start
            for c in range(g.k):
                slot = slots[c]
                buf = data[base + c * chunk : base + (c + 1) * chunk]
                entry = v.table.get(slot, row)
                if entry == UNWRITTEN:
                    buf[:] = 0
                    continue
                if not v.slots[slot].holds(row):
                    return  # reconstruction is the ordinary read's work
                pieces.setdefault(slot, []).append((row, buf))
                chunks[base + c * chunk] = (slot, row, entry)
        data.flags.writeable = False  # readers get views of it; only the reads below fill it
        span = _Span(start, end, data, chunks)
        pool = _pool.get()
        span.done = [pool.submit(self._read, span, slot, v.slots[slot].member, mine)
                     for slot, mine in pieces.items()]
        with self._lock:
            self._spans[index] = span

    # --- the background threads ---------------------------------------------------------------

    def _read(self, span: _Span, slot: int, member: Member, pieces: list[_Piece]) -> bool:
        """Read one member's chunks of a planned span; True if every one arrived."""
        g = self.volume.geometry
        for i, j in row_runs(pieces):
            try:
                member.readinto_uncached(g.chunk_offset(pieces[i][0]),
                                         [memoryview(p[1]) for p in pieces[i:j]])
            except MemberIOError as exc:
                log.debug("slot %d: read-ahead of [%d, %d) failed (%s); the reader will "
                          "read it itself", slot, span.start, span.end, exc)
                return False
        return True

    def close(self) -> None:
        """Stop planning and wait for the spans being read."""
        self._closed = True
        self.settle()

    def settle(self) -> None:
        """Forget every span and wait for those being read (before a member is closed)."""
        with self._lock:
            spans, self._spans = list(self._spans.values()), {}
        for span in spans:
            span.ready()
