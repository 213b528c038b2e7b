"""Reads of volume bytes from the members' data chunks, before any reconstruction.

`read_batched` reads whole chunks (one call per member run) and checks each against its
checksum; `read_in_chunk` reads a small range from the one chunk that holds it, unchecked, for a
caller that checks the bytes itself. Both leave to the volume's careful path whatever they
cannot serve.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from backends.member import MemberIOError
from raid.checksums import UNWRITTEN, chunk_checksum
from raid.readahead import row_runs

if TYPE_CHECKING:
    from raid.volume import Volume

log = logging.getLogger(__name__)


def read_batched(vol: Volume, offset: int, outv: np.ndarray) -> list[int]:
    """Fill `outv` with the bytes at `offset`, reading each member's run of consecutive
    chunks with one call; returns the stripes that need the careful path (a member that
    does not hold its chunk, fails to read, or returns a chunk that fails its checksum).
    """
    g = vol.geometry
    sb, chunk = g.stripe_bytes, g.chunk
    end = offset + len(outv)
    runs: dict[int, list[tuple[int, np.ndarray, int]]] = {}  # slot -> (row, buf, stripe)
    # (slot, row, buf, checksum, stripe, part of the chunk wanted, where it goes in outv)
    checks: list[tuple[int, int, np.ndarray, int, int, int, int, int]] = []
    redo: set[int] = set()
    for stripe in range(offset // sb, (end - 1) // sb + 1):
        group, row = g.locate(stripe)
        slots = g.column_slots(group, row)
        base = stripe * sb
        lo_c = (max(offset, base) - base) // chunk
        hi_c = (min(end, base + sb) - 1 - base) // chunk
        for c in range(lo_c, hi_c + 1):
            slot = slots[c]
            a = base + c * chunk
            lo, hi = max(offset, a), min(end, a + chunk)
            entry = vol.table.get(slot, row)
            if entry == UNWRITTEN:
                outv[lo - offset : hi - offset] = 0
                continue
            if not vol.slots[slot].holds(row):
                redo.add(stripe)
                continue
            if lo == a and hi == a + chunk:
                buf = outv[lo - offset : hi - offset]
            else:  # a chunk cut by the request's ends: read whole, verify, copy the part
                buf = np.empty(chunk, dtype=np.uint8)
            runs.setdefault(slot, []).append((row, buf, stripe))
            checks.append((slot, row, buf, entry, stripe, lo - a, hi - a, lo - offset))
    for slot, pieces in runs.items():
        member = vol.slots[slot].member
        for i, j in row_runs(pieces):
            try:
                member.readinto_many(
                    g.chunk_offset(pieces[i][0]), [memoryview(p[1]) for p in pieces[i:j]]
                )
            except MemberIOError as exc:
                # The careful path reads these chunks again and takes the member out.
                log.debug("slot %d: batched read failed (%s); rereading chunk by chunk",
                          slot, exc)
                redo.update(p[2] for p in pieces[i:j])
    for slot, row, buf, entry, stripe, lo, hi, dst in checks:
        if stripe in redo:
            continue
        if chunk_checksum(buf, slot, row) != entry:
            redo.add(stripe)  # the careful path counts, reconstructs and repairs it
        elif hi - lo < chunk:
            outv[dst : dst + hi - lo] = buf[lo:hi]
    return sorted(redo)


def in_one_chunk(vol: Volume, offset: int, length: int) -> bool:
    """Whether [offset, offset + length) is a part of one data chunk, smaller than the chunk."""
    chunk = vol.geometry.chunk
    at = offset % vol.geometry.stripe_bytes % chunk
    return 0 < length < chunk and at + length <= chunk


def read_in_chunk(vol: Volume, offset: int, outv: np.ndarray) -> bool:
    """Fill `outv` straight from the part of the one data chunk that holds it (see
    `in_one_chunk`), without reading the rest of the chunk or checking its checksum: for a
    caller that checks the bytes itself and, should they fail, reads them again through the
    checked path. False, with `outv` unspecified, where the member does not hold the chunk or
    the read fails (the checked path then reads, counts and reconstructs)."""
    g = vol.geometry
    stripe, within = divmod(offset, g.stripe_bytes)
    c, at = divmod(within, g.chunk)
    group, row = g.locate(stripe)
    slot = g.column_slots(group, row)[c]
    if vol.table.get(slot, row) == UNWRITTEN:
        outv[:] = 0
        return True
    if not vol.slots[slot].holds(row):
        return False
    try:
        vol.slots[slot].member.readinto(g.chunk_offset(row) + at, memoryview(outv))
    except MemberIOError as exc:
        log.debug("slot %d row %d: read of %d bytes failed (%s); reading the chunk carefully",
                  slot, row, len(outv), exc)
        return False
    return True
