"""`dwfs scrub --repair` on a filesystem warehouse, where a stripe lost beyond what redundancy
mends (as a crash while degraded can leave one): chunks no file uses are written as zeros with
new parity, unmounted and through the mount daemon alike; chunks a file uses are reported
unrecoverable and the file reads EIO, never wrong bytes."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest
from mountutil import FsMount, dwfs, force_unmount, make_warehouse

from dwfs.config import load_config
from dwfs.warehouse import meta_path, open_volume
from raid.checksums import UNWRITTEN
from raid.geometry import Geometry
from vfs.alloc import SECTOR
from vfs.freespace import FreeSpace
from vfs.metadb import MetaDB

MiB = 1 << 20


def _geometry(warehouse: str) -> tuple[Geometry, list[str], dict[tuple[int, int], bool]]:
    """The array's geometry, member paths, and which (slot, row) chunks were ever written."""
    cfg = load_config(warehouse)
    vol = open_volume(cfg, read_only=True)
    try:
        g = vol.geometry
        written = {(s, r): vol.table.get(s, r) != UNWRITTEN
                   for s in range(g.members) for r in range(g.rows)}
        return g, cfg.member_paths(), written
    finally:
        vol.close(write=False)


def _rows(warehouse: str, g: Geometry, written, inode: int) -> tuple[list[int], list[int]]:
    """Stripes holding data of `inode`, and written stripes whose data no file uses."""
    db = MetaDB(meta_path(load_config(warehouse)), read_only=True)
    try:
        space = FreeSpace.committed(db, g.capacity)
        mine = set()
        for addr, n in db.rows("SELECT addr, nsect FROM extents WHERE inode=?", (inode,)):
            for b in range(addr * SECTOR, (addr + n) * SECTOR, g.chunk):
                mine.add(b // g.stripe_bytes)
    finally:
        db.close()
    free = []
    for stripe in range(g.stripes):
        group, row = g.locate(stripe)
        slots = g.column_slots(group, row)
        if all(written[(s, row)] for s in slots) and all(
                space.unused(stripe * g.stripe_bytes + c * g.chunk, g.chunk) for c in range(g.k)):
            free.append(stripe)
    return sorted(mine), free


def _lose(g: Geometry, paths: list[str], stripe: int, rng: random.Random) -> int:
    """Rot data column 0 and every parity column of a stripe: one more than redundancy mends.
    Returns the slot of the data column."""
    group, row = g.locate(stripe)
    slots = g.column_slots(group, row)
    for c in (0, *range(g.k, g.group_size)):
        with open(paths[slots[c]], "r+b") as f:
            for pos in rng.sample(range(g.chunk), 3):
                f.seek(g.chunk_offset(row) + pos)
                b = f.read(1)[0]
                f.seek(g.chunk_offset(row) + pos)
                f.write(bytes([b ^ rng.randrange(1, 256)]))
    return slots[0]


def _problems(report: dict) -> dict[int, set[bool]]:
    """{row: {fixed flags}} of the chunk problems a scrub report lists."""
    out: dict[int, set[bool]] = {}
    for p in report["problems"]:
        if p["row"] is not None:
            out.setdefault(p["row"], set()).add(p["fixed"])
    return out


@pytest.mark.timeout(300)
def test_scrub_rewrites_lost_chunks_no_file_uses(tmp_path):
    m = FsMount(make_warehouse(tmp_path / "wh"), tmp_path / "mnt")
    rng = random.Random(11)
    keep = rng.randbytes(3 * MiB)
    try:
        m.mount()
        with open(m.path("keep"), "wb") as f:
            f.write(keep)
        ino = os.stat(m.path("keep")).st_ino
        with open(m.path("gone"), "wb") as f:
            f.write(rng.randbytes(6 * MiB))
        os.unlink(m.path("gone"))  # its stripes were written and are free again
        m.umount()
        g, paths, written = _geometry(m.warehouse)
        used, free = _rows(m.warehouse, g, written, ino)
        assert used and len(free) >= 2, (used, free)
        lost_used, lost_free, later = used[len(used) // 2], free[0], free[1]
        _lose(g, paths, lost_used, rng)
        _lose(g, paths, lost_free, rng)
        row_used, row_free = g.locate(lost_used)[1], g.locate(lost_free)[1]

        # Unmounted: the free stripe is mended, the used one cannot be (exit status 3).
        p = dwfs("scrub", m.warehouse, "--repair", "--json", check=False)
        assert p.returncode == 3, p.stdout + p.stderr
        report = json.loads(p.stdout)
        found = _problems(report)
        assert found[row_free] == {True} and found[row_used] == {False}, report["problems"]
        assert report["unrecoverable"] == 3  # data column 0 and both parities of one stripe
        p = dwfs("scrub", m.warehouse, "--json", check=False)
        assert set(_problems(json.loads(p.stdout))) == {row_used}, p.stdout

        # Through the mount daemon: another free stripe lost meanwhile is mended too.
        _lose(g, paths, later, rng)
        m.mount()
        p = dwfs("scrub", m.warehouse, "--repair", "--json", check=False)
        assert p.returncode == 3, p.stdout + p.stderr
        found = _problems(json.loads(p.stdout))
        assert found[g.locate(later)[1]] == {True} and found[row_used] == {False}, found
        # The file whose stripe was lost: EIO where it was lost, never wrong bytes.
        with open(m.path("keep"), "rb") as f, pytest.raises(OSError) as exc:
            f.read()
        assert exc.value.errno == errno.EIO
        with open(m.path("fresh"), "wb") as f:  # and the mended space takes new files
            f.write(rng.randbytes(8 * MiB))
            os.fsync(f.fileno())
        m.umount()
        p = dwfs("scrub", m.warehouse, "--json", check=False)
        assert set(_problems(json.loads(p.stdout))) == {row_used}, p.stdout
        # fsck names the file that lost data, and nothing else.
        p = dwfs("fsck", m.warehouse, "--verify-data", check=False)
        assert p.returncode != 0 and "keep" in p.stdout and "fresh" not in p.stdout, p.stdout
    finally:
        force_unmount(m.mountpoint, m.warehouse)
