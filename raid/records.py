"""What the volume keeps on every member besides data: labels, the write-intent bitmap and
the checksum-table pages."""

from __future__ import annotations

import logging

import numpy as np

from backends.member import MemberIOError
from raid.errors import UnrecoverableError
from raid.geometry import BITMAP_OFFSET, BITMAP_SIZE, LABEL_OFFSET, TABLE_PAGE
from raid.label import Label, SlotRecord
from raid.table import page_offset

log = logging.getLogger(__name__)

USABLE_STATES = ("active", "rebuilding")


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
            )
            for s in self.slots
        ]
        failed: list[tuple[int, MemberIOError]] = []
        for s in self.slots:
            if not s.writable:
                continue
            label = Label(self.array_uuid, s.index, self.events, self.geometry, clean, records)
            try:
                s.member.write(LABEL_OFFSET, label.to_bytes())
                s.member.flush()
            except MemberIOError as exc:
                failed.append((s.index, exc))
                continue
            s.events = self.events
        for slot, exc in failed:
            self.slots[slot].write_errors += 1
            self.member_failed(slot, exc)

    # --- write-intent bitmap ------------------------------------------------------------------

    def _mark_intent(self, row: int) -> None:
        bit = row // self.geometry.rows_per_intent_bit
        if bit in self._intent:
            return
        self._intent.add(bit)
        self._write_bitmap(durable=True)

    def _write_bitmap(self, durable: bool) -> None:
        bits = np.zeros(BITMAP_SIZE, dtype=np.uint8)
        for b in self._intent:
            bits[b >> 3] |= 1 << (b & 7)
        raw = bits.tobytes()
        for s in self.slots:
            if not s.writable:
                continue
            try:
                if durable:
                    s.member.write_durable(BITMAP_OFFSET, raw)
                else:
                    s.member.write(BITMAP_OFFSET, raw)
            except MemberIOError as exc:
                s.write_errors += 1
                self.member_failed(s.index, exc)
        self._intent_on_disk = bool(self._intent)

    def keep_intent(self, bitmap: bytes) -> None:
        """Keep the regions marked in a stored bitmap marked until the next flush."""
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
        self._intent.update(int(b) for b in np.nonzero(bits)[0])

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
