"""Rebuilding a slot onto a replacement member, online and resumable."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from backends.member import Member, MemberIOError
from raid.checksums import UNWRITTEN
from raid.errors import RaidError, UnrecoverableError
from raid.geometry import BITMAP_OFFSET, BITMAP_SIZE
from raid.table import page_offset
from raid.volume import Volume

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
CHECKPOINT_SECONDS = 1.0
ROWS_PER_LOCK = 16


def attach_replacement(volume: Volume, slot: int, member: Member, path: str) -> None:
    """Put a fresh member into `slot` (taking the old one out) and give it the array metadata."""
    g = volume.geometry
    if not 0 <= slot < g.members:
        raise RaidError(f"slot {slot} does not exist: the array has slots 0 to {g.members - 1}")
    needed = g.member_bytes_needed
    if member.capacity < needed:
        raise RaidError(
            f"replacement {path} holds {member.capacity} bytes; slot {slot} needs {needed}"
        )
    with volume.lock:
        s = volume.slots[slot]
        volume.settle_read_ahead()
        if s.member is not None and s.member is not member:
            try:
                s.member.close()
            except MemberIOError as exc:
                log.warning("slot %d: closing old member %s failed: %s", slot, s.path, exc)
        s.member = None
        s.state = "faulty"
        s.reason = "being replaced"
        volume.flush()
        for p in range(g.table_pages):
            member.write(page_offset(p), volume.table.sealed(p))
            if p % 1024 == 1023:
                volume.table.forget()
        member.write(BITMAP_OFFSET, bytes(BITMAP_SIZE))
        member.flush()
        s.member = member
        s.path = path
        s.state = "rebuilding"
        s.reason = ""
        s.rebuilt_rows = 0
        s.read_errors = s.write_errors = s.checksum_errors = s.repaired = 0
        volume.write_labels()
    log.info("slot %d: %s attached, rebuild starts", slot, path)


class RebuildStopped(RaidError):
    """The rebuild was asked to stop; it resumes from its checkpoint next time."""


def rebuild(
    volume: Volume,
    slot: int,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    max_rate: int | None = None,
) -> None:
    """Reconstruct every chunk of a rebuilding slot, from its checkpoint to the end.

    Setting `stop` makes it checkpoint and raise RebuildStopped. `max_rate` (bytes per second)
    paces it, like md's speed_limit_max, so that the array stays responsive.
    """
    g = volume.geometry
    s = volume.slots[slot]
    if s.state != "rebuilding":
        raise RaidError(f"slot {slot} is {s.state}, not rebuilding")
    group = slot // g.group_size
    total = g.rows * g.chunk
    start = s.rebuilt_rows
    if start:
        log.info("slot %d: resuming rebuild at row %d of %d", slot, start, g.rows)
    last = began = time.monotonic()
    row = start
    while row < g.rows:
        if stop is not None and stop.is_set():
            with volume.lock:
                volume.flush()
                s.rebuilt_rows = row
                volume.write_labels()
            raise RebuildStopped(f"slot {slot}: rebuild stopped at row {row} of {g.rows}")
        with volume.lock:
            if s.state != "rebuilding":
                raise RaidError(f"slot {slot} left the rebuild ({s.state}: {s.reason})")
            end = min(row + ROWS_PER_LOCK, g.rows)
            for r in range(row, end):
                if volume.table.get(slot, r) == UNWRITTEN:
                    continue
                column = g.column_slots(group, r).index(slot)
                try:
                    data = volume.reconstruct(group, r, [column], {})[column]
                except UnrecoverableError as exc:
                    if volume.state() == "failed":
                        raise  # too many members gone: nothing more can be rebuilt
                    # Lost before the rebuild began (a crash tore the row's parity while
                    # degraded): it stays unreadable, never wrong; the rest goes on.
                    log.error("slot %d row %d: cannot be rebuilt, its chunk stays unreadable: "
                              "%s", slot, r, exc)
                    continue
                s.member.write(g.chunk_offset(r), data)
            row = end
            now = time.monotonic()
            if now - last >= CHECKPOINT_SECONDS or row == g.rows:
                volume.flush()
                s.rebuilt_rows = row
                volume.write_labels()
                last = now
                if row % 4096 < ROWS_PER_LOCK:
                    volume.table.forget()
        if progress:
            progress(row * g.chunk, total)
        if max_rate:
            ahead = (row - start) * g.chunk / max_rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)
    with volume.lock:
        volume.flush()
        s.state = "active"
        s.rebuilt_rows = 0
        volume.write_labels()
    log.info("slot %d (%s): rebuild finished", slot, s.path)
