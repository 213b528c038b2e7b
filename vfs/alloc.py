"""Free space of the volume, in 4 KiB sectors: a sorted list of free extents, next-fit.

Freed space is held back until the metadata commit that frees it is durable (`release`), so a
crash can never leave the committed block map pointing at space already reused.

While the volume has a member missing, a `guard` steers new data away from stripes where
parity alone holds a chunk still in use: writing part of such a stripe rewrites its parity
in place, and a crash in the middle would lose that chunk (the RAID write hole while
degraded). Only when no other free space is left does a write go there.
"""

from __future__ import annotations

import bisect
import errno
import logging
from collections.abc import Callable, Iterable

from vfs.errors import FSError

log = logging.getLogger(__name__)

SECTOR = 4096
# (start, count) sectors -> the (start, count, stripe end) of the chunks in the stripes it
# touches that only parity holds
Guard = Callable[[int, int], list[tuple[int, int, int]]]


class Allocator:
    """Hands out runs of free sectors, sequentially from a moving cursor."""

    def __init__(self, total: int, used: Iterable[tuple[int, int]], run: int = 16) -> None:
        """`total` sectors, of which the (start, count) extents in `used` are taken.

        `runs` counts how many separate pieces of `run` contiguous sectors the free extents
        hold (a file block needs up to that many in one piece), so callers can promise space
        that fragmentation cannot take away.
        """
        self.total = total
        self.run = run
        self.runs = 0
        self._starts: list[int] = []
        self._lens: list[int] = []
        self.free_count = 0
        pos = 0
        for start, count in sorted(used):
            if start < pos:
                raise FSError(errno.EUCLEAN, f"sectors {start}+{count} are used twice")
            if start > pos:
                self._append(pos, start - pos)
            pos = start + count
        if pos < total:
            self._append(pos, total - pos)
        self._cursor = 0
        self._floor = 0  # no sector below it is ever handed out
        self.guard: Guard | None = None
        self._warned = False  # that the guard found no other room (once per mount)
        self._held: list[tuple[int, int]] = []
        self._taken: list[tuple[int, int]] = []  # allocated since the last mark was dropped

    def _append(self, start: int, count: int) -> None:
        self._starts.append(start)
        self._lens.append(count)
        self.free_count += count
        self.runs += count // self.run

    @property
    def held_count(self) -> int:
        """Sectors freed but not yet reusable."""
        return sum(c for _s, c in self._held)

    def allocate_each(self, sizes: list[int]) -> list[int]:
        """One start sector per requested size, each a contiguous piece, next-fit in order."""
        total = sum(sizes)
        if total > self.free_count:
            raise FSError(errno.ENOSPC, f"no space left: {total} sectors wanted, "
                          f"{self.free_count} free")
        starts: list[int] = []
        if len(sizes) > 1:
            at = self._take(total)  # all pieces back to back, if some free extent holds them
            if at is not None:
                for n in sizes:
                    starts.append(at)
                    at += n
                self._taken.extend(zip(starts, sizes, strict=True))
                return starts
        for n in sizes:
            at = self._take(n)
            if at is None:
                for start, m in zip(starts, sizes, strict=False):
                    self.free(start, m)
                raise FSError(errno.ENOSPC, f"no space left: no free run of {n} sectors")
            starts.append(at)
        self._taken.extend(zip(starts, sizes, strict=False))
        return starts

    def allocate_split(self, sizes: list[int]) -> list[list[tuple[int, int]]]:
        """Space for each requested size as (start, count) pieces: one contiguous piece where
        free space allows (as `allocate_each`), else several smaller ones, so free space that
        copy-on-write has left in fragments stays usable to the last sector."""
        try:
            return [[(s, n)] for s, n in zip(self.allocate_each(sizes), sizes, strict=True)]
        except FSError as exc:
            if exc.errno != errno.ENOSPC or sum(sizes) > self.free_count:
                raise
        out: list[list[tuple[int, int]]] = []
        for n in sizes:
            pieces: list[tuple[int, int]] = []
            while n:
                at = self._take(n)
                if at is not None:
                    pieces.append((at, n))
                    break
                # No free extent holds the rest: take the next one whole (all are smaller).
                i = max(0, bisect.bisect_right(self._starts, self._cursor) - 1)
                got = self._lens[i]
                at = self._take(got)
                assert at is not None  # extent i is exactly that long
                pieces.append((at, got))
                n -= got
            out.append(pieces)
        self._taken.extend(p for pieces in out for p in pieces)
        return out

    def _take(self, n: int) -> int | None:
        """Carve `n` contiguous sectors from the first free extent at or after the cursor
        (with a guard: the first place it allows, else any)."""
        if self.guard is not None:
            at = self._carve(n, self._guarded)
            if at is not None:
                return at
            if not self._warned:
                self._warned = True
                log.warning("the volume is degraded and full: new data goes into stripes "
                            "where parity alone holds data in use (a crash while writing "
                            "them could lose it); replace the missing member")
        return self._carve(n, None)

    def _guarded(self, start: int, length: int, at: int, n: int) -> int | None:
        """The first place at or after `at` in the free extent (start, length) for `n`
        sectors whose stripes hold no parity-only chunk in use (one outside the extent and
        not wholly overwritten)."""
        assert self.guard is not None
        end = start + length
        while at + n <= end:
            past = None
            for s, c, stripe_end in self.guard(at, n):
                if not (start <= s and s + c <= end) and not (at <= s and s + c <= at + n):
                    past = stripe_end if past is None else max(past, stripe_end)
            if past is None:
                return at
            at = past
        return None

    def _carve(self, n: int, place: Callable[[int, int, int, int], int | None] | None
               ) -> int | None:
        count = len(self._starts)
        i = bisect.bisect_right(self._starts, self._cursor) - 1
        if i < 0:
            i = 0
        for turn in range(count + 1):
            if i >= len(self._starts):
                i = 0
                if not self._starts:
                    break
            start, length = self._starts[i], self._lens[i]
            # Only the first look starts at the cursor; after the wrap the whole extent counts.
            at = self._cursor if turn == 0 and start < self._cursor < start + length else start
            if place is not None and start + length - at >= n:
                at = place(start, length, at, n)
                if at is None:
                    i += 1
                    continue
            if start + length - at >= n:
                head, tail = at - start, start + length - (at + n)
                self.runs += head // self.run + tail // self.run - length // self.run
                if head and tail:
                    self._lens[i] = head
                    self._starts.insert(i + 1, at + n)
                    self._lens.insert(i + 1, tail)
                elif head:
                    self._lens[i] = head
                elif tail:
                    self._starts[i], self._lens[i] = at + n, tail
                else:
                    del self._starts[i]
                    del self._lens[i]
                self.free_count -= n
                self._cursor = at + n if at + n < self.total else 0
                return at
            i += 1
        return None

    def hold(self, start: int, count: int) -> None:
        """Mark sectors freed; they become reusable at the next `release`."""
        self._held.append((start, count))

    def release(self) -> None:
        """Return every held extent to the free list (call after a durable commit)."""
        held, self._held = self._held, []
        for start, count in held:
            self.free(start, count)

    def forget_held(self) -> None:
        """Drop held extents without freeing them (their frees were rolled back)."""
        self._held = []

    def free(self, start: int, count: int) -> None:
        """Return sectors to the free list at once, merging with neighbours (those below the
        `keep_out_below` floor stay out of it)."""
        if start < self._floor:
            count -= min(count, self._floor - start)
            start = self._floor
        if count <= 0:
            return
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._starts[i - 1] + self._lens[i - 1] > start:
            raise FSError(errno.EUCLEAN, f"sectors {start}+{count} freed twice")
        if i < len(self._starts) and start + count > self._starts[i]:
            raise FSError(errno.EUCLEAN, f"sectors {start}+{count} freed twice")
        self.free_count += count
        r = self.run
        if i > 0 and self._starts[i - 1] + self._lens[i - 1] == start:
            self.runs -= self._lens[i - 1] // r
            self._lens[i - 1] += count
            if i < len(self._starts) and start + count == self._starts[i]:
                self.runs -= self._lens[i] // r
                self._lens[i - 1] += self._lens[i]
                del self._starts[i]
                del self._lens[i]
            self.runs += self._lens[i - 1] // r
            return
        if i < len(self._starts) and start + count == self._starts[i]:
            self.runs -= self._lens[i] // r
            self._starts[i] = start
            self._lens[i] += count
            self.runs += self._lens[i] // r
            return
        self._starts.insert(i, start)
        self._lens.insert(i, count)
        self.runs += count // r

    def mark(self) -> AllocatorMark:
        """Remember the current state before an operation that may fail half-way."""
        self._taken.clear()
        return AllocatorMark(len(self._held), 0)

    def undo(self, mark: AllocatorMark) -> None:
        """Give back what was allocated and forget what was held since `mark`."""
        del self._held[mark.held:]
        taken, self._taken = self._taken, []
        for start, count in taken:
            self.free(start, count)

    def keep_out_below(self, end: int) -> None:
        """Never hand out a sector below `end` (space new data must not share): the free ones
        leave the free list now, the ones in use when they are freed."""
        self._floor = max(self._floor, end)
        while self._starts and self._starts[0] < end:
            s, n = self._starts[0], self._lens[0]
            self.runs -= n // self.run
            cut = min(n, end - s)
            self.free_count -= cut
            if cut == n:
                del self._starts[0]
                del self._lens[0]
            else:
                self._starts[0], self._lens[0] = end, n - cut
                self.runs += (n - cut) // self.run

    def is_free(self, start: int, count: int) -> bool:
        """Whether sectors [start, start + count) are all free (not taken, not held)."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._starts[i] + self._lens[i] >= start + count

    def extents(self) -> list[tuple[int, int]]:
        """The free extents, in order (for checks)."""
        return list(zip(self._starts, self._lens, strict=True))


class AllocatorMark:
    """Where an operation started, so that a failed one can give back what it took."""

    __slots__ = ("held", "taken")

    def __init__(self, held: int, taken: int) -> None:
        self.held = held
        self.taken = taken
