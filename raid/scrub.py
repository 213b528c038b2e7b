"""Scrub: verify every written chunk, every checksum-table copy and every row's parity."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raid.checksums import UNWRITTEN
from raid.errors import UnrecoverableError
from raid.geometry import TABLE_PAGE
from raid.table import page_offset
from raid.volume import Volume

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
MAX_LISTED = 100


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


def scrub(volume: Volume, repair: bool = False, progress: Progress | None = None) -> ScrubReport:
    """Check the whole array; with `repair`, rewrite what is wrong from redundancy."""
    g = volume.geometry
    report = ScrubReport(repair, members=[MemberFindings(s.index, s.path) for s in volume.slots])
    with volume.lock:
        volume.check_members()
        _scrub_table(volume, report, repair)
    total = g.rows * g.groups
    for row in range(g.rows):
        with volume.lock:
            for group in range(g.groups):
                _scrub_row(volume, group, row, report, repair)
        report.rows_checked += 1
        if progress and (row % 64 == 0 or row == g.rows - 1):
            progress((row + 1) * g.groups, total)
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


def _scrub_row(volume: Volume, group: int, row: int, report: ScrubReport, repair: bool) -> None:
    g = volume.geometry
    slots = g.column_slots(group, row)
    if all(volume.table.get(slot, row) == UNWRITTEN for slot in slots):
        return
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
        return
    if not bad:
        return
    if not repair:
        for c in bad:
            report.note(slots[c], row, "checksum mismatch", False)
        return
    try:
        rebuilt = volume.reconstruct(group, row, bad, good)
    except UnrecoverableError as exc:
        log.error("scrub: row %d of group %d cannot be repaired: %s", row, group, exc)
        for c in bad:
            report.members[slots[c]].unrecoverable += 1
            report.note(slots[c], row, "checksum mismatch, unrecoverable", False)
        return
    for c in bad:
        volume.rewrite_chunk(slots[c], row, rebuilt[c])
        report.members[slots[c]].fixed += 1
        report.note(slots[c], row, "checksum mismatch", True)
