"""Creating an array on new members, and assembling a volume from its members' labels."""

from __future__ import annotations

import logging
import os
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from backends.devices import read_heads
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
Search = Callable[[], Iterable[str]]  # more paths where members may be found
SEARCH_SECONDS = 10.0  # how long the search waits for devices to give their labels


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


@dataclass
class _Claim:
    """A member that carries this array's label for some slot."""

    path: str
    member: Member
    label: Label
    listed_at: int | None  # its position in the config's list; None if found by searching


@dataclass
class _Listing:
    """What the listed paths held: claims by slot, and per listed position what was wrong
    (state, reason)."""

    claims: dict[int, list[_Claim]] = field(default_factory=dict)
    trouble: dict[int, tuple[str, str]] = field(default_factory=dict)

    def carried_at(self, pos: int) -> int | None:
        """The slot that the member listed at `pos` carries, if it carries one."""
        return next((slot for slot, cs in self.claims.items() for c in cs
                     if c.listed_at == pos), None)


def assemble(
    paths: Sequence[str],
    array_uuid: str,
    opener: Opener,
    allow_failed: bool = False,
    resync: bool = True,
    read_only: bool = False,
    search: Search | None = None,
) -> Volume:
    """Open the members at `paths` (the config's list, in slot order), check their labels and
    start the volume.

    Each member goes into the slot its label names, as md assembles by the role in each
    superblock: member files listed in another order, or disks whose device names changed at
    boot, assemble as they were. A slot no listed path holds is looked for among the paths
    `search` gives (the host's block devices), by label. Where a member was found elsewhere
    than listed, `volume.assembly_notes` says so. Missing members give a degraded start;
    stale and foreign members, and older copies of a member, are refused and named. Beyond
    the level's tolerance this raises AssemblyError unless `allow_failed`. With `read_only`,
    nothing is ever written to the members: no resync, no new labels, no repairs (for a
    read-only mount).
    """
    listing = _read_listed(paths, array_uuid, opener)
    if search is not None and any(s not in listing.claims for s in range(len(paths))):
        _search(listing, paths, array_uuid, opener, search)
    if not listing.claims:
        reasons = "; ".join(f"slot {pos}: {reason}"
                            for pos, (_, reason) in sorted(listing.trouble.items()))
        raise AssemblyError(f"no member of array {array_uuid} could be used: {reasons}")
    newest = max((c.label for cs in listing.claims.values() for c in cs),
                 key=lambda lb: lb.events)
    geometry = newest.geometry
    if len(paths) != geometry.members:
        for cs in listing.claims.values():
            for c in cs:
                _close(c.member, c.path)
        raise AssemblyError(
            f"the configuration lists {len(paths)} members but the array has {geometry.members}"
        )
    slots, labels, notes = _place(listing, paths)
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
    volume.assembly_notes = notes
    resync = resync and not read_only
    state = volume.state()
    if state == "failed" and not allow_failed:
        reasons = "; ".join(f"slot {s.index} {s.state}: {s.reason}" for s in slots
                            if s.state != "active")
        for s in slots:
            if s.member is not None:
                _close(s.member, s.path)
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


def _read_listed(paths: Sequence[str], array_uuid: str, opener: Opener) -> _Listing:
    """Open every listed path and read its label."""
    listing = _Listing()
    for pos, path in enumerate(paths):
        try:
            member = opener(path)
        except MemberIOError as exc:
            log.warning("slot %d: member %s cannot be opened: %s", pos, path, exc)
            listing.trouble[pos] = ("missing", exc.detail)
            continue
        if member.capacity == 0:  # a device node with no disk behind it (a detached loop)
            _close(member, path)
            listing.trouble[pos] = ("missing", f"{path} is empty: no disk behind it")
            continue
        try:
            label = read_label(member)
            wrong = _not_ours(label, path, array_uuid, len(paths))
        except (MemberIOError, LabelError) as exc:
            wrong = f"{path}: {exc}"
        if wrong:
            _close(member, path)
            listing.trouble[pos] = ("foreign", wrong)
            continue
        listing.claims.setdefault(label.slot, []).append(_Claim(path, member, label, pos))
    return listing


def _not_ours(label: Label, path: str, array_uuid: str, slots: int) -> str | None:
    """Why the member at `path` with `label` is no member of this array, or None."""
    if label.array_uuid != array_uuid:
        return f"{path} belongs to array {label.array_uuid}, not {array_uuid}"
    if not 0 <= label.slot < slots:
        return f"{path} carries slot {label.slot}, beyond the {slots} listed"
    return None


def _search(listing: _Listing, paths: Sequence[str], array_uuid: str, opener: Opener,
            search: Search) -> None:
    """Look for the members of slots that no listed path holds among `search()`'s paths."""
    known = {os.path.realpath(p) for p in paths}
    candidates = [p for p in search() if os.path.realpath(p) not in known]
    heads = read_heads(candidates, LABEL_SIZE, SEARCH_SECONDS)
    for path in candidates:
        head = heads.get(path)
        if not head:
            continue
        try:
            label = Label.from_bytes(head)
        except LabelError:  # most devices hold something else: not a member of anything
            continue
        if _not_ours(label, path, array_uuid, len(paths)) or label.slot in listing.claims:
            continue
        try:
            member = opener(path)
        except MemberIOError as exc:
            log.warning("slot %d: %s carries its label but cannot be opened: %s", label.slot,
                        path, exc)
            continue
        try:
            label = read_label(member)  # (read again through the member, as it will be used)
        except (MemberIOError, LabelError) as exc:
            log.warning("slot %d: %s changed under the search: %s", label.slot, path, exc)
            _close(member, path)
            continue
        listing.claims[label.slot] = [_Claim(path, member, label, None)]


def _place(listing: _Listing, paths: Sequence[str]
           ) -> tuple[list[Slot], dict[int, Label], list[str]]:
    """The slots in index order, each with the member whose label names it (the newest copy
    if several do), the labels of the placed members, and notes on members found elsewhere
    than listed."""
    slots: list[Slot] = []
    labels: dict[int, Label] = {}
    notes: list[str] = []
    for index, listed in enumerate(paths):
        claims = sorted(listing.claims.get(index, []),
                        key=lambda c: (-c.label.events, c.listed_at != index))
        if not claims:
            state, reason = listing.trouble.get(index, ("missing", ""))
            carried = listing.carried_at(index)
            if carried is not None:
                reason = f"no member carries slot {index}; {listed} carries slot {carried}"
            if state == "foreign" or carried is not None:
                log.error("slot %d: refusing member: %s", index, reason)
            slots.append(Slot(index, listed, None, state, reason=reason))
            continue
        best, *older = claims
        for c in older:
            log.error("slot %d: refusing member: %s also carries slot %d (events %d); %s "
                      "(events %d) is used", index, c.path, index, c.label.events, best.path,
                      best.label.events)
            _close(c.member, c.path)
        if best.path != listed:
            note = f"slot {index}: member found at {best.path}, listed as {listed}"
            log.warning("%s", note)
            notes.append(note)
        slots.append(Slot(index, best.path, best.member, "active", events=best.label.events))
        labels[index] = best.label
    return slots, labels, notes


def _close(member: Member, path: str) -> None:
    try:
        member.close()
    except MemberIOError as exc:
        log.warning("closing refused member %s failed: %s", path, exc)


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
