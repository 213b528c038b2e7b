"""The RAID write hole while degraded: which chunks only parity holds, and how a stripe whose
chunks a crash made unrecoverable stays writable.

Writing part of a stripe rewrites its parity in place. With every member present, a crash in
the middle is mended by the resync (raid.assemble); a chunk whose member is missing exists only
as parity and is lost with it. The filesystem keeps new data out of such stripes while it can
(vfs.alloc's guard); what a crash still tears stays unreadable, never wrong.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from raid.errors import UnrecoverableError

if TYPE_CHECKING:
    from raid.volume import Volume

log = logging.getLogger(__name__)


def parity_only_chunks(volume: Volume, offset: int, length: int) -> list[tuple[int, int, int]]:
    """The data chunks (offset, length, end of their stripe) in the stripes that
    [offset, offset+length) touches whose member is missing or not yet rebuilt there: parity
    alone holds them. Empty while every member is whole."""
    g = volume.geometry
    if length <= 0 or all(s.state == "active" and s.member is not None for s in volume.slots):
        return []
    out = []
    first, last = offset // g.stripe_bytes, (offset + length - 1) // g.stripe_bytes
    for stripe in range(first, min(last + 1, g.stripes)):
        group, row = g.locate(stripe)
        for c, slot in enumerate(g.column_slots(group, row)[: g.k]):
            if not volume.slots[slot].holds(row):
                out.append((stripe * g.stripe_bytes + c * g.chunk, g.chunk,
                            (stripe + 1) * g.stripe_bytes))
    return out


def columns_of_lost_row(volume: Volume, group: int, row: int, need: list[int],
                        exc: UnrecoverableError) -> dict[int, np.ndarray]:
    """Columns `need` of a row with chunks that can no longer be reconstructed (a crash tore
    its parity while degraded; see resync_row), for new parity: a missing member's chunk counts
    as zeros there, a mismatching one as its bytes, and both keep failing their checksums (EIO,
    never wrong bytes), so the rest of the stripe stays writable."""
    slots = volume.geometry.column_slots(group, row)
    got: dict[int, np.ndarray] = {}
    lost = []
    for c in need:
        buf, how = volume.load_chunk(slots[c], row, count=False)
        if how != "ok":
            lost.append(slots[c])
        if buf is None:
            buf = np.zeros(volume.geometry.chunk, dtype=np.uint8)
        got[c] = buf
    log.warning("group %d row %d: the chunks of slots %s cannot be reconstructed (%s); new "
                "parity keeps them as they are, unreadable", group, row, lost, exc)
    return got
