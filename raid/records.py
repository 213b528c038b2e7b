"""What the volume keeps on every member besides data: labels, the write-intent bitmap and
the checksum-table pages."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.member import MemberIOError
from raid.errors import RaidError, UnrecoverableError
from raid.geometry import BITMAP_OFFSET, BITMAP_SIZE, LABEL_OFFSET, TABLE_PAGE
from raid.label import ERROR_COUNTS, Label, SlotRecord
from raid.pools import SharedPool
from raid.table import page_offset

log = logging.getLogger(__name__)

USABLE_STATES = ("active", "rebuilding")
# A write-intent region stays marked this long after its last write (md's bitmap delay), so
# that a program that writes and fsyncs the same place over and over (a database) pays for one
# durable bitmap write, not one per fsync. A region left marked costs only its resync after a
# crash; a clean close clears every bit.
INTENT_LINGER = 5.0
# Flushes and durable records go to every member at once: each member may be its own disk.
_member_pool = SharedPool(16, "member-sync")


class MemberRecords:
    """Labels, write-intent bitmap and checksum-table pages for Volume (a mixin: it uses the
    slots, geometry and failure handling of Volume)."""

    # --- labels -------------------------------------------------------------------------------

    def write_labels(self, clean: bool = False) -> None:
        """Write a new label (events + 1) to every working member and make it durable."""
        if self.read_only:
            return  # a failed member is known to this run only, as in `dwfs status`
        self.events += 1
        records = [
            SlotRecord(
                s.state if s.state in USABLE_STATES else "faulty",
                s.rebuilt_rows if s.state == "rebuilding" else 0,
                *(getattr(s, k) for k in ERROR_COUNTS),
            )
            for s in self.slots
        ]

        def write(s: Any) -> None:
            label = Label(self.array_uuid, s.index, self.events, self.geometry, clean, records)
            s.member.write(LABEL_OFFSET, label.to_bytes())
            s.member.flush()
            s.events = self.events

        self.on_members(write)

    def clear_error_counts(self) -> None:
        """Forget every member's error counts (the user dealt with their cause), in the labels
        too."""
        if self.read_only:
            raise RaidError("the volume is open read-only: error counts cannot be cleared",
                            errno.EROFS)
        with self.lock:
            self._check_open()
            for s in self.slots:
                for k in ERROR_COUNTS:
                    setattr(s, k, 0)
            self.write_labels(clean=False)  # (closing writes them clean again)
        log.info("error counts of every member cleared")

    def on_members(self, work: Callable[[Any], None]) -> None:
        """Run `work(slot)` for every writable slot, on all members at once, and return when
        all are done; a member whose work fails (MemberIOError) is taken out of service."""
        slots = [s for s in self.slots if s.writable]
        failed: list[tuple[Any, MemberIOError]] = []
        if len(slots) == 1:
            try:
                work(slots[0])
            except MemberIOError as exc:
                failed.append((slots[0], exc))
        elif slots:
            pool = _member_pool.get()
            for s, future in [(s, pool.submit(work, s)) for s in slots]:
                try:
                    future.result()
                except MemberIOError as exc:
                    failed.append((s, exc))
        for s, exc in failed:
            s.write_errors += 1
            self.member_failed(s.index, exc)

    # --- write-intent bitmap ------------------------------------------------------------------

    def _mark_intent(self, row: int) -> None:
        """Mark the write-intent region of `row` (durably, before the row is written)."""
        bit = row // self.geometry.rows_per_intent_bit
        known = bit in self._intent
        self._intent[bit] = time.monotonic()
        if not known:
            self._write_bitmap(durable=True)

    def _release_intent(self, everything: bool) -> None:
        """After a flush (every write so far durable): unmark the regions not written for
        INTENT_LINGER seconds, or all of them."""
        since = float("inf") if everything else time.monotonic() - INTENT_LINGER
        kept = {b: t for b, t in self._intent.items() if t >= since}
        if len(kept) < len(self._intent) or (self._intent_on_disk and not kept):
            self._intent = kept
            self._write_bitmap(durable=False)

    def _write_bitmap(self, durable: bool) -> None:
        bits = np.zeros(BITMAP_SIZE, dtype=np.uint8)
        for b in self._intent:
            bits[b >> 3] |= 1 << (b & 7)
        raw = bits.tobytes()
        if durable:
            self.on_members(lambda s: s.member.write_durable(BITMAP_OFFSET, raw))
        else:
            self.on_members(lambda s: s.member.write(BITMAP_OFFSET, raw))
        self._intent_on_disk = bool(self._intent)

    def keep_intent(self, bitmap: bytes) -> None:
        """Keep the regions marked in a stored bitmap marked until flushes release them."""
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
        now = time.monotonic()
        for b in np.nonzero(bits)[0]:
            self._intent[int(b)] = now

    def intent_rows(self, bitmap: bytes) -> list[range]:
        """Row ranges marked in a stored bitmap."""
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
        rpb = self.geometry.rows_per_intent_bit
        return [
            range(int(b) * rpb, min((int(b) + 1) * rpb, self.geometry.rows))
            for b in np.nonzero(bits)[0]
        ]

    # --- checksum-table pages -----------------------------------------------------------------

    def _read_table_page(self, page_no: int) -> np.ndarray:
        # Newest label first: a member one label update behind is still accepted (a crash can
        # interrupt a label update), but it may be an old image whose table copy is outdated.
        for s in sorted(self.slots, key=lambda s: -s.events):
            if s.state != "active" or s.member is None:
                continue
            try:
                raw = s.member.read(page_offset(page_no), TABLE_PAGE)
            except MemberIOError as exc:
                s.read_errors += 1
                self.member_failed(s.index, exc)
                continue
            page = self.table.verify(raw, page_no)
            if page is None:
                s.checksum_errors += 1
                log.warning(
                    "slot %d (%s): checksum-table page %d is corrupt (scrub --repair mends it)",
                    s.index, s.path, page_no,
                )
                continue
            return page
        raise UnrecoverableError(
            f"checksum-table page {page_no} is unreadable or corrupt on every member"
        )
