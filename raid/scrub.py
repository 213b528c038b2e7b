"""Scrub: verify every written chunk, every checksum-table copy and every row's parity.

A row that redundancy can no longer mend (a crash tore its parity while a member was missing)
is mended with `--repair` only where the layer above says its lost data chunks hold nothing
(`FreeSpace`): those chunks become zeros and the row's parity is written anew. Lost chunks
that are in use stay unreadable and are reported (EIO for their readers, never wrong bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from raid.checksums import UNWRITTEN
from raid.errors import UnrecoverableError
from raid.geometry import TABLE_PAGE
from raid.table import page_offset
from raid.volume import Volume

log = logging.getLogger(__name__)
_NO_LOCK = nullcontext()

Progress = Callable[[int, int], None]
MAX_LISTED = 100


class FreeSpace(Protocol):
    """What the layer above the volume says about volume bytes it does not use."""

    lock: AbstractContextManager  # held, before the volume lock, while asking and rewriting

    def unused(self, offset: int, length: int) -> bool:
        """Whether no data lives in volume bytes [offset, offset + length)."""
        ...


@dataclass
class MemberFindings:
    """What scrub found and mended on one member."""

    slot: int
    path: str
    checksum_errors: int = 0
    read_errors: int = 0
    parity_mismatches: int = 0
    table_errors: int = 0
    fixed: int = 0
    unrecoverable: int = 0


@dataclass
class ScrubReport:
    """The outcome of a scrub, per member and in total."""

    repair: bool
    rows_checked: int = 0
    bytes_checked: int = 0
    members: list[MemberFindings] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(
            m.checksum_errors + m.read_errors + m.parity_mismatches + m.table_errors
            for m in self.members
        )

    @property
    def fixed(self) -> int:
        return sum(m.fixed for m in self.members)

    @property
    def unrecoverable(self) -> int:
        return sum(m.unrecoverable for m in self.members)

    @property
    def clean(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict:
        return {
            "repair": self.repair,
            "rows_checked": self.rows_checked,
            "bytes_checked": self.bytes_checked,
            "errors": self.errors,
            "fixed": self.fixed,
            "unrecoverable": self.unrecoverable,
            "members": [vars(m) for m in self.members],
            "problems": self.problems,
        }

    def note(self, slot: int, row: int | None, kind: str, fixed: bool) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append({"slot": slot, "row": row, "kind": kind, "fixed": fixed})


def scrub(volume: Volume, repair: bool = False, progress: Progress | None = None,
          space: FreeSpace | None = None) -> ScrubReport:
    """Check the whole array; with `repair`, rewrite what is wrong from redundancy, and lost
    chunks that `space` says hold nothing as zeros."""
    g = volume.geometry
    report = ScrubReport(repair, members=[MemberFindings(s.index, s.path) for s in volume.slots])
    with volume.lock:
        volume.check_members()
        _scrub_table(volume, report, repair)
    total = g.rows * g.groups
    lost: list[tuple[int, int]] = []  # (group, row) that redundancy cannot mend
    for row in range(g.rows):
        with volume.lock:
            for group in range(g.groups):
                if _scrub_row(volume, group, row, report, repair):
                    lost.append((group, row))
        report.rows_checked += 1
        if progress and (row % 64 == 0 or row == g.rows - 1):
            progress((row + 1) * g.groups, total)
    for group, row in lost:
        _mend_lost_row(volume, group, row, report, space)
    if repair:
        volume.flush()
    return report


def _scrub_table(volume: Volume, report: ScrubReport, repair: bool) -> None:
    g = volume.geometry
    for p in range(g.table_pages):
        good = volume.table.sealed(p) if p not in volume.table.dirty else None
        if good is None:
            continue
        for s in volume.slots:
            if s.state != "active":
                continue
            raw = s.member.read(page_offset(p), TABLE_PAGE)
            if raw == good:
                continue
            findings = report.members[s.index]
            findings.table_errors += 1
            fixed = False
            if repair:
                s.member.write(page_offset(p), good)
                findings.fixed += 1
                fixed = True
            report.note(s.index, None, f"checksum-table page {p}", fixed)
        if p % 1024 == 1023:
            volume.table.forget()


def _scrub_row(volume: Volume, group: int, row: int, report: ScrubReport, repair: bool) -> bool:
    """Check (and with `repair` mend) one row; True if it needs `_mend_lost_row`."""
    g = volume.geometry
    slots = g.column_slots(group, row)
    if all(volume.table.get(slot, row) == UNWRITTEN for slot in slots):
        return False
    good: dict[int, np.ndarray] = {}
    bad: list[int] = []
    for c, slot in enumerate(slots):
        s = volume.slots[slot]
        before = s.read_errors
        buf, how = volume.load_chunk(slot, row)
        if how == "ok":
            good[c] = buf
            report.bytes_checked += g.chunk
        elif how == "corrupt":
            report.members[slot].checksum_errors += 1
            bad.append(c)
        elif s.read_errors > before:
            report.members[slot].read_errors += 1
            report.note(slot, row, "read error", False)
    if len(good) == g.group_size and g.m:
        data = np.stack([good[c] for c in range(g.k)])
        parity = volume.codec.encode(data)
        for j in range(g.m):
            if not np.array_equal(parity[j], good[g.k + j]):
                slot = slots[g.k + j]
                report.members[slot].parity_mismatches += 1
                fixed = False
                if repair:
                    volume.store_row(group, row, data, [])
                    report.members[slot].fixed += 1
                    fixed = True
                report.note(slot, row, "parity mismatch", fixed)
        return False
    if not bad:
        return False
    if not repair:
        for c in bad:
            report.note(slots[c], row, "checksum mismatch", False)
        return False
    try:
        rebuilt = volume.reconstruct(group, row, bad, good)
    except UnrecoverableError:
        return True
    for c in bad:
        volume.rewrite_chunk(slots[c], row, rebuilt[c])
        report.members[slots[c]].fixed += 1
        report.note(slots[c], row, "checksum mismatch", True)
    return False


def _mend_lost_row(volume: Volume, group: int, row: int, report: ScrubReport,
                   space: FreeSpace | None) -> None:
    """A row redundancy could not mend: if every lost data chunk in it is unused, write those
    as zeros and the parity anew; otherwise report the mismatching chunks unrecoverable."""
    g = volume.geometry
    slots = g.column_slots(group, row)
    stripe = row * g.groups + group
    with (space.lock if space is not None else _NO_LOCK), volume.lock:
        volume.flush()  # what the stripe cache holds for the row reaches the members first
        loaded = [volume.load_chunk(slot, row, count=False) for slot in slots]
        lost = [c for c, (_, how) in enumerate(loaded) if how != "ok"]
        if not lost:
            return  # written again since the check: nothing is lost any more
        lost_data = [c for c in lost if c < g.k]
        mended = space is not None and all(
            space.unused(stripe * g.stripe_bytes + c * g.chunk, g.chunk) for c in lost_data)
        if mended:
            zeros = np.zeros(g.chunk, dtype=np.uint8)
            data = np.stack([zeros if c in lost else loaded[c][0] for c in range(g.k)])
            volume.store_row(group, row, data, lost_data)
    if mended:
        log.warning("scrub: row %d of group %d could not be reconstructed; its lost chunks "
                    "hold no data and were written as zeros with new parity", row, group)
    else:
        log.error("scrub: row %d of group %d cannot be repaired: redundancy cannot reconstruct "
                  "its columns %s%s", row, group, lost,
                  "" if space is None else ", and data lives in them")
    for c in lost:
        if loaded[c][1] == "corrupt":
            findings = report.members[slots[c]]
            if mended:
                findings.fixed += 1
                report.note(slots[c], row, "checksum mismatch in unused space, rewritten", True)
            else:
                findings.unrecoverable += 1
                report.note(slots[c], row, "checksum mismatch, unrecoverable", False)
