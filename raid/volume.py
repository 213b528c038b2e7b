"""The redundant volume: a flat byte address space striped with parity over members.

Reads verify every chunk against its checksum and reconstruct from redundancy what is missing,
unreadable or corrupt (rewriting corrupt chunks in place). Writes compute parity once per stripe,
mark the stripe's region in the write-intent bitmap before touching members, and update the
replicated checksum table, which reaches the members on flush.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass

import numpy as np

from backends.member import Member, MemberIOError
from raid import writehole
from raid.checksums import UNWRITTEN, array_seed, chunk_checksum
from raid.chunkreads import in_one_chunk, read_batched, read_in_chunk
from raid.errors import RaidError, UnrecoverableError
from raid.geometry import Geometry
from raid.readahead import ReadAhead
from raid.records import USABLE_STATES, MemberRecords
from raid.stripecache import PendingStripe, StripeCache
from raid.table import ChecksumTable, page_offset

log = logging.getLogger(__name__)

STRIPE_CACHE_BYTES = 32 * 1024 * 1024


@dataclass
class Slot:
    """One member position of the array and what is known about its member."""

    index: int
    path: str
    member: Member | None
    state: str  # active | rebuilding | faulty | missing | stale | foreign
    reason: str = ""
    rebuilt_rows: int = 0
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0
    repaired: int = 0
    events: int = 0  # events of the label this member last got

    def holds(self, row: int) -> bool:
        """Whether this member has valid data for `row`."""
        if self.member is None:
            return False
        if self.state == "active":
            return True
        return self.state == "rebuilding" and row < self.rebuilt_rows

    @property
    def writable(self) -> bool:
        return self.member is not None and self.state in USABLE_STATES


class Volume(MemberRecords):
    """A redundant logical volume: read, write, flush, status, close."""

    def __init__(
        self,
        geometry: Geometry,
        array_uuid: str,
        slots: list[Slot],
        events: int,
    ) -> None:
        self.geometry = geometry
        self.array_uuid = array_uuid
        self.slots = slots
        self.events = events
        self.lock = threading.RLock()
        self.codec = geometry.codec
        self.table = ChecksumTable(geometry, array_seed(array_uuid), self._read_table_page)
        self._zero_chunk = np.zeros(geometry.chunk, dtype=np.uint8)
        self._zero_chunk.flags.writeable = False
        self._cache = StripeCache(geometry.stripe_bytes, STRIPE_CACHE_BYTES)
        self._intent: dict[int, float] = {}  # write-intent bit: when last marked
        self._intent_on_disk = False
        self._ahead = ReadAhead(self)
        self._closed = False
        self.read_only = False  # set by assembly: nothing is written, not even repairs
        self.assembly_notes: list[str] = []  # set by assembly: members found where not listed

    # --- public interface ---------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Usable bytes."""
        return self.geometry.capacity

    @property
    def stripe_bytes(self) -> int:
        """Volume bytes per stripe: a write of less rewrites parity in place."""
        return self.geometry.stripe_bytes

    def parity_only_chunks(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """The data chunks near a range that parity alone holds (see raid.writehole)."""
        return writehole.parity_only_chunks(self, offset, length)

    def read(self, offset: int, length: int, caller_checks: bool = False
             ) -> bytearray | memoryview:
        """Bytes at [offset, offset + length), short at the end of the volume.

        `caller_checks`: the caller checks the bytes against checksums of its own and, if they
        fail, reads them again without it. A small read inside one chunk then reads just its
        bytes, not the whole chunk its checksum covers (a 4 KiB read of a 256 KiB chunk), and
        bytes read ahead are not checked against their chunks' checksums as well."""
        n = self._clamp(offset, length)
        ahead = self._from_read_ahead(offset, n, caller_checks)
        if ahead is not None:
            return memoryview(ahead)
        out = bytearray(n)
        self._read_into(offset, np.frombuffer(out, dtype=np.uint8), caller_checks)
        return out

    def read_array(self, offset: int, length: int) -> np.ndarray:
        """Like `read`, as a uint8 array (new, or a view of bytes read ahead), sparing the
        zero-filling of a bytearray."""
        n = self._clamp(offset, length)
        ahead = self._from_read_ahead(offset, n)
        if ahead is not None:
            return ahead
        out = np.empty(n, dtype=np.uint8)
        self._read_into(offset, out)
        return out

    def _from_read_ahead(self, offset: int, length: int, caller_checks: bool = False
                         ) -> np.ndarray | None:
        """The bytes at [offset, offset + length) if they were read ahead, else None (see
        `read` for `caller_checks`)."""
        ahead = self._ahead.take(offset, length, caller_checks)
        if ahead is not None:
            with self.lock:
                self._check_open()
                self._ahead.follow(offset, length)
                self.table.trim()  # the spans `follow` plans load pages too
        return ahead

    def _clamp(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise RaidError(f"invalid read range {offset}+{length}", errno.EINVAL)
        return max(0, min(length, self.capacity - offset))

    def _read_into(self, offset: int, outv: np.ndarray, caller_checks: bool = False) -> None:
        """Fill `outv` (every byte of it) with the verified bytes at `offset` (see `read` for
        `caller_checks`)."""
        length = len(outv)
        if not length:
            return
        sb = self.geometry.stripe_bytes
        small = caller_checks and in_one_chunk(self, offset, length)
        with self.lock:
            self._check_open()
            if self._cache.pending:
                self._commit_range(offset // sb, (offset + length - 1) // sb)
            self._ahead.follow(offset, length, hint_own=not small)
            if not (small and read_in_chunk(self, offset, outv)):
                for stripe in read_batched(self, offset, outv):
                    self._read_stripe(offset, outv, stripe)
            self.table.trim()

    def _read_stripe(self, offset: int, outv: np.ndarray, stripe: int) -> None:
        """Fill the part of `outv` that falls in `stripe`, chunk by chunk, reconstructing from
        redundancy (and repairing) whatever is missing, unreadable or corrupt."""
        sb, chunk = self.geometry.stripe_bytes, self.geometry.chunk
        length = len(outv)
        pos = max(0, stripe * sb - offset)
        within = offset + pos - stripe * sb
        n = min(sb - within, length - pos)
        c0, c1 = within // chunk, (within + n - 1) // chunk
        group, row = self.geometry.locate(stripe)
        base = pos - within  # output index of the stripe's first byte
        whole = {
            c: outv[base + c * chunk : base + (c + 1) * chunk]
            for c in range(c0, c1 + 1)
            if within <= c * chunk and (c + 1) * chunk <= within + n
        }
        cols = self._columns(group, row, list(range(c0, c1 + 1)), into=whole)
        for c in range(c0, c1 + 1):
            if c in whole:
                continue
            lo = max(within, c * chunk)
            hi = min(within + n, (c + 1) * chunk)
            outv[base + lo : base + hi] = cols[c][lo - c * chunk : hi - c * chunk]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `offset`; durable after the next flush."""
        view = memoryview(data).cast("B")
        if self.read_only:
            raise RaidError("the volume is open read-only", errno.EROFS)
        if offset < 0:
            raise RaidError(f"invalid write offset {offset}", errno.EINVAL)
        if offset + len(view) > self.capacity:
            raise RaidError(
                f"write of {len(view)} bytes at {offset} passes the end of the volume "
                f"({self.capacity} bytes)",
                errno.ENOSPC,
            )
        sb = self.geometry.stripe_bytes
        pos = 0
        with self.lock:
            self._check_open()
            self._ahead.invalidate(offset, len(view))
            while pos < len(view):
                stripe, within = divmod(offset + pos, sb)
                n = min(sb - within, len(view) - pos)
                piece = view[pos : pos + n]
                pos += n
                if n == sb and stripe not in self._cache.pending:
                    group, row = self.geometry.locate(stripe)
                    data = np.frombuffer(piece, dtype=np.uint8).reshape(self.geometry.k, -1)
                    self.store_row(group, row, data, list(range(self.geometry.k)))
                    continue
                pending = self._cache.get_or_create(stripe)
                pending.add(within, piece)
                if pending.full:
                    self._commit(stripe, self._cache.pop(stripe))
                elif self._cache.over_limit():
                    self._commit(*self._cache.pop_oldest())

    def flush(self) -> None:
        """Make every write so far durable on every working member."""
        with self.lock:
            self._check_open()
            self._commit_all()
            self._flush_locked()

    def close(self, write: bool = True) -> None:
        """Flush, mark the array clean in every label and release the members.

        With `write=False` (a read-only inspection) nothing is written to the members.
        """
        with self.lock:
            if self._closed:
                return
            self._ahead.close()
            if write and not self.read_only:
                self._commit_all()
                self._flush_locked(final=True)
                self.write_labels(clean=True)
            self._closed = True
            for s in self.slots:
                if s.member is not None:
                    try:
                        s.member.close()
                    except MemberIOError as exc:
                        log.warning("slot %d: closing %s failed: %s", s.index, s.path, exc)

    def state(self) -> str:
        """clean, degraded, rebuilding or failed."""
        worst = 0
        for g in range(self.geometry.groups):
            size = self.geometry.group_size
            bad = sum(1 for s in self.slots[g * size : (g + 1) * size] if s.state != "active")
            worst = max(worst, bad)
        if worst > self.geometry.tolerance:
            return "failed"
        if any(s.state == "rebuilding" for s in self.slots):
            return "rebuilding"
        return "degraded" if worst else "clean"

    def status(self) -> dict:
        """Level, tolerance, capacity, state and per-member health."""
        with self.lock:
            if not self._closed:
                self.check_members()
            chunk = self.geometry.chunk
            return {
                "level": self.geometry.level,
                "tolerance": self.geometry.tolerance,
                "capacity_bytes": self.capacity,
                "chunk_bytes": chunk,
                "state": self.state(),
                "array_uuid": self.array_uuid,
                "events": self.events,
                "members": [
                    {
                        "slot": s.index,
                        "path": s.path,
                        "state": s.state,
                        "reason": s.reason,
                        "read_errors": s.read_errors,
                        "write_errors": s.write_errors,
                        "checksum_errors": s.checksum_errors,
                        "repaired": s.repaired,
                        "rebuilt_bytes": (
                            s.rebuilt_rows * chunk if s.state == "rebuilding" else None
                        ),
                    }
                    for s in self.slots
                ],
            }

    def check_members(self) -> None:
        """Mark faulty every member whose backing store has gone away."""
        for s in self.slots:
            if s.writable:
                try:
                    s.member.check()
                except MemberIOError as exc:
                    self.member_failed(s.index, exc)

    # --- reading ------------------------------------------------------------------------------

    def load_chunk(
        self, slot: int, row: int, out: np.ndarray | None = None, count: bool = True
    ) -> tuple[np.ndarray | None, str]:
        """A chunk as stored, verified: (data, "ok"), (None, "missing") or (data, "corrupt").

        The chunk is read into `out` when given. A mismatch counts as a checksum error of the
        member unless `count` is False (resync, where it may be an interrupted write).
        """
        entry = self.table.get(slot, row)
        if entry == UNWRITTEN:
            if out is None:
                return self._zero_chunk, "ok"
            out[:] = 0
            return out, "ok"
        s = self.slots[slot]
        if not s.holds(row):
            return None, "missing"
        buf = np.empty(self.geometry.chunk, dtype=np.uint8) if out is None else out
        try:
            s.member.readinto(self.geometry.chunk_offset(row), memoryview(buf))
        except MemberIOError as exc:
            s.read_errors += 1
            self.member_failed(slot, exc)
            return None, "missing"
        if chunk_checksum(buf, slot, row) != entry:
            if not count:
                return buf, "corrupt"
            s.checksum_errors += 1
            log.warning(
                "slot %d (%s): checksum mismatch in row %d; reconstructing", slot, s.path, row
            )
            return buf, "corrupt"
        return buf, "ok"

    def _columns(
        self,
        group: int,
        row: int,
        wanted: list[int],
        repair: bool = True,
        into: dict[int, np.ndarray] | None = None,
    ) -> dict[int, np.ndarray]:
        """Verified contents of columns `wanted` of a group's row, reconstructing as needed.

        Columns named in `into` are read (or reconstructed) into those buffers.
        """
        into = into or {}
        slots = self.geometry.column_slots(group, row)
        got: dict[int, np.ndarray] = {}
        bad: list[tuple[int, str]] = []
        for c in wanted:
            buf, how = self.load_chunk(slots[c], row, into.get(c))
            if how == "ok":
                got[c] = buf
            else:
                bad.append((c, how))
        if not bad:
            return got
        rebuilt = self.reconstruct(group, row, [c for c, _ in bad], got)
        for c, how in bad:
            got[c] = rebuilt[c]
            if c in into:
                into[c][:] = rebuilt[c]
                got[c] = into[c]
            if how == "corrupt" and repair:
                self.rewrite_chunk(slots[c], row, rebuilt[c])
        return got

    def reconstruct(
        self, group: int, row: int, lost: list[int], known: dict[int, np.ndarray],
        count: bool = True,
    ) -> dict[int, np.ndarray]:
        """Columns `lost` of a row recomputed from verified other columns (a mismatch among
        them counts as the member's checksum error unless `count` is False, as in
        `load_chunk`)."""
        g = self.geometry
        slots = g.column_slots(group, row)
        sources = {c: b for c, b in known.items() if c not in lost}
        for c in range(g.group_size):
            if len(sources) >= g.k:
                break
            if c in sources or c in lost:
                continue
            buf, how = self.load_chunk(slots[c], row, count=count)
            if how == "ok":
                sources[c] = buf
        if len(sources) < g.k:
            missing = g.group_size - len(sources)
            raise UnrecoverableError(
                f"row {row} of group {group}: {missing} of {g.group_size} chunks unavailable "
                f"and {g.level} recovers at most {g.m}"
            )
        block = self.codec.reconstruct(sources, lost)
        out: dict[int, np.ndarray] = {}
        for i, c in enumerate(lost):
            entry = self.table.get(slots[c], row)
            data = self._zero_chunk if entry == UNWRITTEN else block[i]
            if entry != UNWRITTEN and chunk_checksum(data, slots[c], row) != entry:
                raise UnrecoverableError(
                    f"row {row} of group {group}: the chunk of slot {slots[c]} reconstructed "
                    "from redundancy does not match its checksum"
                )
            out[c] = data
        return out

    def rewrite_chunk(self, slot: int, row: int, data: np.ndarray) -> None:
        """Write repaired or rebuilt chunk data back to its member."""
        s = self.slots[slot]
        if self.read_only:
            log.warning("slot %d (%s): row %d left unrepaired: the volume is open read-only",
                        slot, s.path, row)
            return
        if not s.writable:
            return
        try:
            s.member.write(self.geometry.chunk_offset(row), data)
        except MemberIOError as exc:
            s.write_errors += 1
            self.member_failed(slot, exc)
            return
        s.repaired += 1
        log.info("slot %d (%s): row %d repaired from redundancy", slot, s.path, row)

    # --- writing ------------------------------------------------------------------------------

    def _commit(self, stripe: int, pending: PendingStripe) -> None:
        """Store a pending stripe, reading the columns it does not cover entirely."""
        g = self.geometry
        chunk = g.chunk
        group, row = g.locate(stripe)
        if pending.full:
            self.store_row(group, row, pending.data.reshape(g.k, chunk), list(range(g.k)))
            return
        spans = [(c * chunk, (c + 1) * chunk) for c in range(g.k)]
        need = [c for c, (a, b) in enumerate(spans) if not pending.covers(a, b)]
        changed = [c for c, (a, b) in enumerate(spans) if pending.touches(a, b)]
        data = np.empty((g.k, chunk), dtype=np.uint8)
        try:
            columns = self._columns(group, row, need)
        except UnrecoverableError as exc:
            columns = writehole.columns_of_lost_row(self, group, row, need, exc)
        for c, buf in columns.items():
            data[c] = buf
        flat = data.reshape(-1)
        for a, b in pending.covered:
            flat[a:b] = pending.data[a:b]
        self.store_row(group, row, data, changed)

    def settle_read_ahead(self) -> None:
        """Forget what was read ahead and wait for member reads in flight (before a member is
        closed or replaced under the volume)."""
        self._ahead.settle()

    def pending_stripes(self, first: int, last: int) -> bool:
        """Whether a stripe in [first, last] has writes waiting in the stripe cache."""
        return any(first <= s <= last for s in self._cache.pending)

    def _commit_range(self, first: int, last: int) -> None:
        for stripe in sorted(s for s in self._cache.pending if first <= s <= last):
            self._commit(stripe, self._cache.pop(stripe))

    def _commit_all(self) -> None:
        for stripe in sorted(self._cache.pending):
            self._commit(stripe, self._cache.pop(stripe))

    def store_row(self, group: int, row: int, data: np.ndarray, changed: list[int]) -> None:
        """Write data columns `changed` of a row and all its parity, updating checksums."""
        g = self.geometry
        slots = g.column_slots(group, row)
        self._require_writable(group, row)
        parity = self.codec.encode(data)
        self._mark_intent(row)
        columns = [(c, data[c]) for c in changed] + [
            (g.k + j, parity[j]) for j in range(g.m)
        ]
        whole = len(changed) == g.k  # a whole row: part of a stream of them, most likely
        for c, buf in columns:
            slot = slots[c]
            s = self.slots[slot]
            if s.writable:
                try:
                    put = s.member.write_stream if whole else s.member.write
                    put(g.chunk_offset(row), buf)
                except MemberIOError as exc:
                    s.write_errors += 1
                    self.member_failed(slot, exc)
            self.table.set(slot, row, chunk_checksum(buf, slot, row))
        self._require_writable(group, row)

    def _require_writable(self, group: int, row: int) -> None:
        g = self.geometry
        slots = g.column_slots(group, row)
        lost = sum(1 for slot in slots if not self.slots[slot].writable)
        if lost > g.m:
            raise UnrecoverableError(
                f"group {group} has {lost} of {g.group_size} members failed; "
                f"{g.level} tolerates {g.m}: the volume has failed"
            )

    # --- flushing and failures ----------------------------------------------------------------

    def _flush_locked(self, final: bool = False) -> None:
        pages = [(page_offset(p), self.table.sealed(p)) for p in sorted(self.table.dirty)]
        self.table.dirty.clear()

        def flush(s: Slot) -> None:
            for offset, raw in pages:
                s.member.write(offset, raw)
            s.member.flush()

        self.on_members(flush)
        self.table.trim()
        self._release_intent(everything=final)

    def member_failed(self, slot: int, exc: Exception) -> None:
        """Take a member out of service after an I/O failure and record it in the labels."""
        s = self.slots[slot]
        if s.state not in USABLE_STATES:
            return
        log.error("slot %d (%s) failed and is taken out of service: %s", slot, s.path, exc)
        s.state = "faulty"
        s.reason = str(exc)
        if not self._closed:
            self.write_labels()

    def _check_open(self) -> None:
        if self._closed:
            raise RaidError("the volume is closed", errno.EBADF)
