"""Small reads of file data: the volume reads just their bytes, unchecked, and the filesystem's
sector checksums stand in for the chunk's; damage they find is read again through the volume's
checks, which reconstruct and repair it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import test_vfs_unit
from test_extents import check_clean
from test_vfs_unit import mkfile
from volhelpers import LEVEL_MEMBERS, build, open_vol, remove_member

from raid.levels import LEVELS
from vfs.alloc import SECTOR
from vfs.attrs import ROOT_INODE

env = test_vfs_unit.env  # the fixture: a filesystem on a small raidz2 volume, reopenable


def bytes_read() -> int:
    """Bytes this process has read through read system calls so far."""
    with open("/proc/self/io", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_small_read_the_caller_checks_reads_only_its_bytes(tmp_path):
    paths, uuid, g = build(str(tmp_path / "m"), "raidz2", 5, chunk=65536, rows=16)
    vol = open_vol(paths, uuid)
    data = np.random.default_rng(5).integers(0, 256, g.capacity, dtype=np.uint8).tobytes()
    vol.write(0, data)
    vol.flush()
    off = 3 * g.stripe_bytes + g.chunk + 8192  # inside the second chunk of stripe 3
    before = bytes_read()
    assert bytes(vol.read(off, 4096, caller_checks=True)) == data[off : off + 4096]
    small = bytes_read() - before
    before = bytes_read()
    assert bytes(vol.read(off + 40960, 4096)) == data[off + 40960 : off + 45056]
    whole = bytes_read() - before
    assert small < g.chunk // 4 and whole >= g.chunk  # rchar also counts /proc/self/io
    # A range that crosses chunks is read and checked whole, as without the flag.
    edge = 3 * g.stripe_bytes + 2 * g.chunk - 2048
    assert bytes(vol.read(edge, 4096, caller_checks=True)) == data[edge : edge + 4096]
    vol.close()


def member_place(env, ino: int, file_offset: int) -> tuple[int, int]:
    """The slot and member-file offset holding byte `file_offset` of inode `ino`."""
    (e,) = [e for e in env.fs.data.map.overlapping(ino, file_offset // SECTOR,
                                                      file_offset // SECTOR)]
    at = (e.addr + file_offset // SECTOR - e.sector) * SECTOR + file_offset % SECTOR
    g = env.vol.geometry
    stripe, within = divmod(at, g.stripe_bytes)
    group, row = g.locate(stripe)
    return g.column_slots(group, row)[within // g.chunk], g.chunk_offset(row) + within % g.chunk


def test_a_corrupt_sector_met_by_a_small_read_is_read_again_and_repaired(env):
    fs = env.fs
    data = os.urandom(1 << 20)
    ino = mkfile(fs, ROOT_INODE, b"f", data)
    fs.commit()
    off = 300 * 1024
    slot, place = member_place(env, ino, off + 100)
    with open(env.paths[slot], "r+b") as f:
        f.seek(place)
        old = f.read(1)
        f.seek(place)
        f.write(bytes([old[0] ^ 0x5A]))
    assert bytes(fs.read(ino, off, 4096)) == data[off : off + 4096]
    member = env.vol.status()["members"][slot]
    assert member["checksum_errors"] == 1 and member["repaired"] == 1
    with open(env.paths[slot], "rb") as f:  # repaired in place on the member
        f.seek(place)
        assert f.read(1) == old
    assert bytes(fs.read(ino, off, 4096)) == data[off : off + 4096]
    assert env.vol.status()["members"][slot]["checksum_errors"] == 1
    check_clean(env)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_flagged_small_reads_match_the_data_on_every_level_healthy_and_degraded(tmp_path, level):
    """Small reads the caller checks return the written bytes on every level, with all
    members and with the first member gone (its chunks then come from redundancy)."""
    paths, uuid, g = build(str(tmp_path / "m"), level, LEVEL_MEMBERS[level], chunk=16384,
                           rows=8)
    vol = open_vol(paths, uuid)
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, g.capacity, dtype=np.uint8).tobytes()
    vol.write(0, data)
    vol.close()
    ranges = [(int(rng.integers(0, g.capacity - 4096)), int(rng.integers(1, 4097)))
              for _ in range(200)]
    for degraded in (False, True):
        if degraded:
            if g.tolerance == 0:
                break
            remove_member(paths[0])
        vol = open_vol(paths, uuid)
        try:
            assert vol.state() == ("degraded" if degraded else "clean")
            for off, n in ranges:
                assert bytes(vol.read(off, n, caller_checks=True)) == data[off : off + n]
        finally:
            vol.close(write=False)
