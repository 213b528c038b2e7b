"""Creating an array on new members, and assembling a volume from its members' labels."""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from backends.member import Member, MemberIOError
from raid.checksums import UNWRITTEN, array_seed, chunk_checksum
from raid.errors import ArrayCreateError, AssemblyError, UnrecoverableError
from raid.geometry import BITMAP_OFFSET, BITMAP_SIZE, LABEL_OFFSET, LABEL_SIZE, Geometry
from raid.label import ERROR_COUNTS, Label, LabelError, SlotRecord
from raid.table import empty_page, page_offset
from raid.volume import Slot, Volume

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Opener = Callable[[str], Member]


def create_array(
    members: Sequence[Member],
    level: str,
    chunk: int,
    array_uuid: str | None = None,
    progress: Progress | None = None,
) -> tuple[str, Geometry]:
    """Write labels, empty bitmaps and empty checksum tables to new members.

    Returns the array UUID and geometry. The members' data areas are not touched: a chunk that
    was never written reads as zeros.
    """
    if not members:
        raise ArrayCreateError("an array needs at least one member")
    capacity = min(m.capacity for m in members)
    geometry = Geometry.plan(level, len(members), chunk, capacity)
    array_uuid = array_uuid or str(uuidlib.uuid4())
    seed = array_seed(array_uuid)
    pages = geometry.table_pages
    total = pages * len(members)
    done = 0
    records = [SlotRecord() for _ in members]
    batch = 256
    for slot, member in enumerate(members):
        for start in range(0, pages, batch):
            end = min(start + batch, pages)
            raw = b"".join(empty_page(p, seed) for p in range(start, end))
            member.write(page_offset(start), raw)
            done += end - start
            if progress:
                progress(done, total)
        member.write(BITMAP_OFFSET, bytes(BITMAP_SIZE))
        label = Label(array_uuid, slot, 1, geometry, True, records)
        member.write(LABEL_OFFSET, label.to_bytes())
        member.flush()
    return array_uuid, geometry


def read_label(member: Member) -> Label:
    """The label at the start of a member."""
    return Label.from_bytes(member.read(LABEL_OFFSET, LABEL_SIZE))


def assemble(
    paths: Sequence[str],
    array_uuid: str,
    opener: Opener,
    allow_failed: bool = False,
    resync: bool = True,
    read_only: bool = False,
) -> Volume:
    """Open the members at `paths` (slot order), check their labels and start the volume.

    Missing members give a degraded start; stale, swapped and foreign members are refused and
    named. Beyond the level's tolerance this raises AssemblyError unless `allow_failed`.
    With `read_only`, nothing is ever written to the members: no resync, no new labels, no
    repairs (for a read-only mount).
    """
    slots: list[Slot] = []
    labels: dict[int, Label] = {}
    for slot, path in enumerate(paths):
        try:
            member = opener(path)
        except MemberIOError as exc:
            log.warning("slot %d: member %s cannot be opened: %s", slot, path, exc)
            slots.append(Slot(slot, path, None, "missing", reason=exc.detail))
            continue
        try:
            label = read_label(member)
        except (MemberIOError, LabelError) as exc:
            _refuse(slots, slot, path, member, "foreign", f"{path}: {exc}")
            continue
        if label.array_uuid != array_uuid:
            _refuse(slots, slot, path, member, "foreign",
                    f"{path} belongs to array {label.array_uuid}, not {array_uuid}")
            continue
        if label.slot != slot:
            _refuse(slots, slot, path, member, "foreign",
                    f"{path} carries slot {label.slot} but is listed as slot {slot} "
                    "(members swapped?)")
            continue
        slots.append(Slot(slot, path, member, "active", events=label.events))
        labels[slot] = label
    if not labels:
        reasons = "; ".join(f"slot {s.index}: {s.reason}" for s in slots)
        raise AssemblyError(f"no member of array {array_uuid} could be used: {reasons}")
    newest = max(labels.values(), key=lambda lb: lb.events)
    geometry = newest.geometry
    if len(paths) != geometry.members:
        raise AssemblyError(
            f"the configuration lists {len(paths)} members but the array has {geometry.members}"
        )
    for slot, label in list(labels.items()):
        s = slots[slot]
        record = newest.slots[slot]
        if label.geometry != geometry:
            _stale(s, f"{s.path} has geometry {label.geometry}, the array {geometry}")
        elif record.state == "faulty":
            _stale(s, f"{s.path} was failed out of the array (events {label.events}, "
                      f"array at {newest.events})")
        elif label.events < newest.events - 1:
            _stale(s, f"{s.path} is stale: events {label.events}, array at {newest.events}")
        elif record.state == "rebuilding":
            s.state = "rebuilding"
            s.rebuilt_rows = record.rebuilt_rows
        if s.state in ("stale",):
            del labels[slot]
    for s in slots:  # error counts go on from where the newest label left them
        for k in ERROR_COUNTS:
            setattr(s, k, getattr(newest.slots[s.index], k))
    volume = Volume(geometry, array_uuid, slots, newest.events)
    volume.read_only = read_only
    resync = resync and not read_only
    state = volume.state()
    if state == "failed" and not allow_failed:
        reasons = "; ".join(f"slot {s.index} {s.state}: {s.reason}" for s in slots
                            if s.state != "active")
        raise AssemblyError(
            f"{geometry.level} tolerates {geometry.tolerance} failed members per group; "
            f"too many are unusable: {reasons}"
        )
    for s in slots:
        if s.state not in ("active", "rebuilding"):
            log.warning("slot %d (%s) is %s: %s", s.index, s.path, s.state, s.reason)
    if state != "failed":
        lagging = [slot for slot, lb in labels.items()
                   if lb.events < newest.events and slots[slot].state == "active"]
        if resync and lagging:
            _refresh_table_copies(volume, lagging)
        dirty = [lb for lb in labels.values() if not lb.clean]
        if resync and dirty:
            _resync(volume, labels)
        if resync:
            volume.write_labels(clean=False)
    return volume


def _refuse(slots: list[Slot], slot: int, path: str, member: Member, state: str,
            reason: str) -> None:
    log.error("slot %d: refusing member: %s", slot, reason)
    try:
        member.close()
    except MemberIOError as exc:
        log.warning("slot %d: closing refused member %s failed: %s", slot, path, exc)
    slots.append(Slot(slot, path, None, state, reason=reason))


def _stale(s: Slot, reason: str) -> None:
    log.error("slot %d: refusing member: %s", s.index, reason)
    if s.member is not None:
        try:
            s.member.close()
        except MemberIOError as exc:
            log.warning("slot %d: closing %s failed: %s", s.index, s.path, exc)
    s.member = None
    s.state = "stale"
    s.reason = reason


def _refresh_table_copies(volume: Volume, lagging: list[int]) -> None:
    """Give members whose label is one update behind the checksum table of the newest ones.

    Such a member is accepted (a crash can interrupt a label update), but it may also be an
    old image whose table copy, valid but outdated, would vouch for outdated chunks. Its
    chunks are checked against the current table like any other's.
    """
    g = volume.geometry
    for slot in lagging:
        s = volume.slots[slot]
        mended = 0
        try:
            for p in range(g.table_pages):
                good = volume.table.sealed(p)
                if s.member.read(page_offset(p), len(good)) != good:
                    s.member.write(page_offset(p), good)
                    mended += 1
                if p % 1024 == 1023:
                    volume.table.forget()
            s.member.flush()
        except MemberIOError as exc:
            volume.member_failed(slot, exc)
            continue
        if mended:
            log.warning("slot %d (%s) was one label update behind and held %d outdated "
                        "checksum-table pages: rewritten", slot, s.path, mended)


def _resync(volume: Volume, labels: dict[int, Label]) -> None:
    """Make parity and checksums of every region marked in a bitmap consistent again."""
    merged = np.zeros(BITMAP_SIZE, dtype=np.uint8)
    for slot in labels:
        s = volume.slots[slot]
        if s.member is None:
            continue
        try:
            merged |= np.frombuffer(s.member.read(BITMAP_OFFSET, BITMAP_SIZE), dtype=np.uint8)
        except MemberIOError as exc:
            volume.member_failed(slot, exc)
    regions = volume.intent_rows(merged.tobytes())
    if not regions:
        return
    rows = sum(len(r) for r in regions)
    log.warning("array %s was not shut down cleanly: resyncing %d rows of %d groups",
                volume.array_uuid, rows, volume.geometry.groups)
    g = volume.geometry
    with volume.lock:
        # Keep every marked region marked until the resync is done: without this, the first
        # row resynced rewrites the bitmap with its own region only, and a crash during the
        # resync would leave the other regions inconsistent and unmarked.
        volume.keep_intent(merged.tobytes())
        outcomes: Counter[str] = Counter()
        for region in regions:
            for row in region:
                for group in range(g.groups):
                    outcomes.update(resync_row(volume, group, row))
            # A flush interrupted part way leaves some members with the new copy of a table
            # page and others with the old one, both valid. The resync trusted the copy it
            # read: write that copy to every member, or a later read from another member's
            # copy would find the resynced chunks "corrupt".
            first = g.table_index(0, region.start)[0]
            last = g.table_index(g.members - 1, region.stop - 1)[0]
            for p in range(first, last + 1):
                volume.table.page(p)
                volume.table.dirty.add(p)
        volume.flush()
    log.warning("array %s: resync of %d rows done: %d chunks of interrupted writes rolled back "
                "from parity, %d kept as written, %d rows unrecoverable",
                volume.array_uuid, rows, outcomes["rolled back"], outcomes["kept"],
                outcomes["lost"])


def resync_row(volume: Volume, group: int, row: int) -> list[str]:
    """Trust verified data columns, recompute parity and checksums of one row; what was found
    ("rolled back", "kept" per chunk, "lost" for the row). Mismatches here are interrupted
    writes, not damage: they are not counted as members' checksum errors.

    A row whose missing member's chunk cannot be reconstructed any more (the crash tore the
    parity of a degraded array) is "lost": that chunk stays unreadable, never wrong. Its torn
    chunks still keep their bytes and get their checksums: a write tears only the sectors it
    changes, so data in use beside them in the chunk is intact and readable."""
    g = volume.geometry
    slots = g.column_slots(group, row)
    data = np.zeros((g.k, g.chunk), dtype=np.uint8)
    changed: list[int] = []
    found: list[str] = []
    missing: list[int] = []
    for c in range(g.k):
        slot = slots[c]
        entry = volume.table.get(slot, row)
        buf, how = volume.load_chunk(slot, row, count=False)
        if how == "ok":
            data[c] = buf
            continue
        if how == "missing":
            missing.append(c)
            continue
        # A torn, never-flushed write: try the old contents from parity, else keep the bytes.
        try:
            data[c] = volume.reconstruct(group, row, [c], {}, count=False)[c]
            volume.rewrite_chunk(slot, row, data[c])
            found.append("rolled back")
        except UnrecoverableError:
            log.debug("resync of row %d: slot %d holds an interrupted write; keeping its bytes "
                      "(entry %x)", row, slot, entry)
            data[c] = buf
            changed.append(c)
            found.append("kept")
    for c in missing:
        try:
            data[c] = volume.reconstruct(group, row, [c], {}, count=False)[c]
        except UnrecoverableError as exc:
            log.error("resync of row %d, group %d: the chunk of missing slot %d is lost: %s",
                      row, group, slots[c], exc)
            for k in changed:  # kept as they are: their parity cannot be made right
                volume.table.set(slots[k], row, chunk_checksum(data[k], slots[k], row))
            return [*found, "lost"]
    if all(volume.table.get(slots[c], row) == UNWRITTEN for c in range(g.k)) and not changed:
        return found
    volume.store_row(group, row, data, changed)  # also records the kept chunks' checksums
    return found
