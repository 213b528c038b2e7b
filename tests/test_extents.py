"""The sector-granular block map (vfs/extents.py, vfs/filedata.py) without a kernel: a byte
model at sector-edge offsets, one-sector rewrites that touch nothing else, per-sector checks,
fsck of extents, and the upgrade of format-2 databases (one checksum per 64 KiB block)."""

from __future__ import annotations

import errno
import os
import random

import pytest
import test_vfs_unit
from test_vfs_unit import Env, errno_of, mkfile, read_all

from vfs import fsck
from vfs.alloc import SECTOR
from vfs.attrs import ROOT_INODE, SetAttr
from vfs.content import (
    COLLAPSE_RANGE,
    KEEP_SIZE,
    MAX_FILE_SIZE,
    PUNCH_HOLE,
    ZERO_RANGE,
)
from vfs.errors import FSError
from vfs.extents import GROUP_SECTORS, block_checksum
from vfs.filedata import BLOCK
from vfs.metacopy import latest_copy, write_copy
from vfs.metadb import FORMAT_VERSION, MetaDB

env = test_vfs_unit.env  # the fixture: a filesystem on a small raidz2 volume, reopenable


def extents(fs, ino: int) -> list[tuple[int, int, int]]:
    """(first file sector, sectors, volume sector) of a file's extents, in file order."""
    return list(fs.db.rows("SELECT sector, nsect, addr FROM extents WHERE inode=? "
                           "ORDER BY sector", (ino,)))


def stored_sectors(model: bytes | bytearray) -> int:
    """Sectors of `model` that are not all zeros (what the block map must hold)."""
    return sum(1 for p in range(0, len(model), SECTOR) if any(model[p : p + SECTOR]))


def check_clean(env: Env) -> None:
    report = fsck.check(env.db, env.vol, verify_data=True)
    assert report.clean, report.problems


def test_byte_model_at_sector_edges(env):
    """Writes, zero writes, truncates, commits and reopens at offsets around sector and block
    edges, against a bytearray: every read agrees, and after a commit the file stores
    exactly its non-zero sectors."""
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f")
    model = bytearray()
    rng = random.Random(11)
    group = GROUP_SECTORS * SECTOR  # extents never cross these
    edges = [0, 1, SECTOR - 1, SECTOR, SECTOR + 1, 3 * SECTOR, BLOCK - SECTOR, BLOCK - 1, BLOCK,
             BLOCK + SECTOR - 1, 5 * BLOCK + 7 * SECTOR, group - BLOCK - 5, group - SECTOR,
             group - 1, group, group + SECTOR + 3]
    for step in range(300):
        off = rng.choice(edges + [len(model), rng.randrange(group + 2 * BLOCK)])
        n = rng.choice([1, 100, SECTOR - 1, SECTOR, SECTOR + 1, 2 * SECTOR, BLOCK, BLOCK + 3])
        data = bytes(n) if rng.random() < 0.15 else rng.randbytes(n)
        fs.write(f, off, data)
        if off > len(model):
            model += bytes(off - len(model))
        model[off : off + n] = data
        u = rng.random()
        if u < 0.1:
            size = rng.choice([0, rng.randrange(len(model) + 1), len(model) + SECTOR + 5])
            fs.setattr(f, SetAttr(size=size))
            model = model[:size] + bytes(max(0, size - len(model)))
        elif u < 0.25:
            fs.commit()
        elif u < 0.3:
            fs = env.reopen()
        r_off = rng.choice(edges + [rng.randrange(len(model) + 10)])
        r_n = rng.choice([1, SECTOR, SECTOR + 2, BLOCK, 3 * BLOCK])
        assert fs.read(f, r_off, r_n) == bytes(model[r_off : r_off + r_n]), step
    fs.commit()
    assert read_all(fs, f) == bytes(model)
    assert fs.getattr(f).blocks == stored_sectors(model) * SECTOR // 512
    check_clean(env)
    fs = env.reopen()
    assert read_all(fs, f) == bytes(model)


def test_fallocate_byte_model(env):
    """fallocate's punch, zero-range and allocate modes at offsets around sector, block and
    group edges, among writes, truncates, commits and reopens, against a bytearray: reads
    agree, a punched range is a hole again, and the space of what it covered comes back."""
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f")
    model = bytearray()
    rng = random.Random(5)
    group = GROUP_SECTORS * SECTOR
    edges = [0, 1, SECTOR - 1, SECTOR, SECTOR + 1, BLOCK - 1, BLOCK, BLOCK + SECTOR + 7,
             group - SECTOR - 1, group, group + 3 * BLOCK]
    lengths = [1, SECTOR - 1, SECTOR, SECTOR + 1, BLOCK, 2 * BLOCK + 5, group, 3 * group]
    for step in range(300):
        off, n = rng.choice(edges), rng.choice(lengths)
        u = rng.random()
        if u < 0.35:
            data = rng.randbytes(n)
            fs.write(f, off, data)
            model += bytes(max(0, off + n - len(model)))
            model[off : off + n] = data
        elif u < 0.85:
            mode = rng.choice([0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE,
                               ZERO_RANGE | KEEP_SIZE])
            fs.fallocate(f, mode, off, n)
            end = min(off + n, len(model))
            if mode & (PUNCH_HOLE | ZERO_RANGE) and off < end:
                model[off:end] = bytes(end - off)
            if not mode & KEEP_SIZE:
                model += bytes(max(0, off + n - len(model)))
        elif u < 0.9:
            size = rng.choice([0, rng.randrange(len(model) + 1)])
            fs.setattr(f, SetAttr(size=size))
            del model[size:]
        elif u < 0.97:
            fs.commit()
        else:
            fs = env.reopen()
        assert fs.getattr(f).size == len(model), step
        r_off = rng.choice(edges + [rng.randrange(len(model) + 10)])
        assert fs.read(f, r_off, 3 * BLOCK) == bytes(model[r_off : r_off + 3 * BLOCK]), step
    fs.commit()
    assert read_all(fs, f) == bytes(model)
    assert fs.getattr(f).blocks == stored_sectors(model) * SECTOR // 512
    check_clean(env)
    # Punching the whole file frees all its sectors.
    free = fs.statfs()["bfree"]
    fs.fallocate(f, PUNCH_HOLE | KEEP_SIZE, 0, len(model) + 1)
    fs.commit()
    assert fs.getattr(f).blocks == 0 and fs.getattr(f).size == len(model)
    assert fs.statfs()["bfree"] >= free + stored_sectors(model) * SECTOR // fs.statfs()["bsize"]
    assert read_all(fs, f) == bytes(len(model))
    check_clean(env)


def test_seek_data_and_hole(env):
    """SEEK_DATA and SEEK_HOLE against a byte model: before a commit, only data-bearing
    answers (what lies before the next data reads as zeros, a hole's start reads as zeros);
    after it, exactly the non-zero sectors are data. ENXIO at and past the end."""
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f")
    model = bytearray()
    rng = random.Random(3)
    group = GROUP_SECTORS * SECTOR
    for step in range(60):
        for _ in range(rng.randrange(1, 4)):
            off = rng.choice([0, SECTOR, BLOCK - 1, BLOCK, group - SECTOR, group + BLOCK,
                              rng.randrange(3 * group)])
            n = rng.choice([1, SECTOR, 3 * SECTOR + 1, BLOCK, 2 * group])
            data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)
            fs.write(f, off, data)
            model += bytes(max(0, off + n - len(model)))
            model[off : off + n] = data
        committed = rng.random() < 0.5
        if committed:
            fs.commit()
        size = len(model)
        offsets = [0, 1, SECTOR, BLOCK + 5, group, size - 1] + [rng.randrange(size)
                                                                 for _ in range(5)]
        for o in [o for o in offsets if o < size]:
            d, h = fs.seek(f, o, os.SEEK_DATA) if any(model[o:]) else None, \
                fs.seek(f, o, os.SEEK_HOLE)
            assert o <= h <= size, step
            if d is not None:
                assert o <= d < size and not any(model[o:d]), step
            if committed:
                sectors = range(o // SECTOR, -(-size // SECTOR))
                data_at = [s for s in sectors if any(model[s * SECTOR : (s + 1) * SECTOR])]
                hole_at = [s for s in sectors if not any(model[s * SECTOR : (s + 1) * SECTOR])]
                assert d == (max(o, data_at[0] * SECTOR) if data_at else None), step
                assert h == (min(size, max(o, hole_at[0] * SECTOR)) if hole_at else size), step
            elif h < size:
                assert not any(model[h : (h // SECTOR + 1) * SECTOR]), step
        if not any(model):
            assert errno_of(fs.seek, f, 0, os.SEEK_DATA) == errno.ENXIO
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            assert errno_of(fs.seek, f, size, whence) == errno.ENXIO
            assert errno_of(fs.seek, f, size + 10, whence) == errno.ENXIO


def test_fallocate_errors_change_nothing(env):
    """Unsupported modes, bad ranges, non-files, sizes past the largest file and ranges the
    volume has no room for each fail with their errno and leave the file as it was."""
    fs = env.fs
    data = os.urandom(3 * BLOCK + 5)
    f = mkfile(fs, ROOT_INODE, b"f", data)
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, test_vfs_unit.ROOT).ino
    free = fs.statfs()["bavail"] * fs.statfs()["bsize"]
    cases = [
        (f, COLLAPSE_RANGE, 0, BLOCK, errno.EOPNOTSUPP),
        (f, PUNCH_HOLE, 0, BLOCK, errno.EOPNOTSUPP),  # a hole must keep the size
        (f, PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE, 0, BLOCK, errno.EOPNOTSUPP),
        (f, 0, 0, 0, errno.EINVAL),
        (f, PUNCH_HOLE | KEEP_SIZE, -1, 5, errno.EINVAL),
        (f, 0, MAX_FILE_SIZE - 10, 11, errno.EFBIG),
        (f, 0, 0, free + 64 * BLOCK, errno.ENOSPC),
        (f, KEEP_SIZE, 10 * BLOCK, free + 64 * BLOCK, errno.ENOSPC),
        (d, 0, 0, BLOCK, errno.EISDIR),
    ]
    for ino, mode, off, n, code in cases:
        assert errno_of(fs.fallocate, ino, mode, off, n) == code, (mode, off, n)
        assert fs.getattr(f).size == len(data)
        assert read_all(fs, f) == data
    # Room that exists is found (the file's own stored sectors count as room).
    fs.fallocate(f, 0, 0, free // 2)
    assert fs.getattr(f).size == free // 2
    assert fs.read(f, 0, len(data)) == data
    check_clean(env)


def test_one_sector_rewrite_touches_nothing_else(env):
    """Rewriting one sector of a stored block stores just that sector: its neighbours are not
    read (a damaged neighbour does not stop the write), keep their place on the volume, and
    the file's stored size does not change."""
    fs = env.fs
    data = bytearray(os.urandom(2 * BLOCK))
    f = mkfile(fs, ROOT_INODE, b"f", bytes(data))
    fs.commit()
    ((s0, n0, a0),) = extents(fs, f)  # one write: one extent
    assert (s0, n0) == (0, 2 * BLOCK // SECTOR)
    # Damage sector 6 on the volume (through the volume, so only the file checksum sees it).
    fs.volume.write((a0 + 6) * SECTOR, os.urandom(SECTOR))
    new = os.urandom(SECTOR)
    fs.write(f, 5 * SECTOR, new)
    fs.commit()
    data[5 * SECTOR : 6 * SECTOR] = new
    rows = extents(fs, f)
    assert [r[:2] for r in rows] == [(0, 5), (5, 1), (6, 26)]
    assert rows[0][2] == a0 and rows[2][2] == a0 + 6  # kept in place
    assert rows[1][2] not in range(a0, a0 + 32)  # copy-on-write
    assert fs.getattr(f).blocks == 2 * BLOCK // 512
    # Every sector but the damaged one reads back; the damaged one is EIO, nothing else.
    assert fs.read(f, 0, 6 * SECTOR) == bytes(data[: 6 * SECTOR])
    assert fs.read(f, 7 * SECTOR, 2 * BLOCK) == bytes(data[7 * SECTOR :])
    assert errno_of(fs.read, f, 6 * SECTOR + 100, 10) == errno.EIO
    assert errno_of(fs.read, f, 0, 2 * BLOCK) == errno.EIO
    report = fsck.check(env.db, env.vol, verify_data=True)
    assert f in report.damaged_files
    assert any("file sector 6" in p for p in report.problems), report.problems


def test_partial_sector_write_reads_only_that_sector(env):
    """A write covering part of a sector merges it with the stored sector; the sectors around
    it are not read."""
    fs = env.fs
    data = bytearray(os.urandom(BLOCK))
    f = mkfile(fs, ROOT_INODE, b"f", bytes(data))
    fs.commit()
    ((_s, _n, a0),) = extents(fs, f)
    fs.volume.write((a0 + 3) * SECTOR, os.urandom(SECTOR))  # damage a neighbour
    fs.write(f, 2 * SECTOR + 10, b"hello")
    data[2 * SECTOR + 10 : 2 * SECTOR + 15] = b"hello"
    fs.commit()
    assert fs.read(f, 2 * SECTOR, SECTOR) == bytes(data[2 * SECTOR : 3 * SECTOR])
    assert errno_of(fs.write, f, 3 * SECTOR + 1, b"x") == errno.EIO  # needs the damaged one
    assert fs.read(f, 0, 3 * SECTOR) == bytes(data[: 3 * SECTOR])


def test_zero_sectors_are_holes(env):
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f", os.urandom(BLOCK))
    fs.write(f, 4 * SECTOR, bytes(3 * SECTOR))  # punches three sectors
    fs.commit()
    assert [r[:2] for r in extents(fs, f)] == [(0, 4), (7, 9)]
    assert fs.getattr(f).blocks == 13 * SECTOR // 512
    assert fs.read(f, 4 * SECTOR, 3 * SECTOR) == bytes(3 * SECTOR)


def test_truncate_inside_an_extent(env):
    fs = env.fs
    data = os.urandom(BLOCK)
    f = mkfile(fs, ROOT_INODE, b"f", data)
    fs.commit()
    fs.setattr(f, SetAttr(size=3 * SECTOR + 100))
    fs.commit()
    assert [r[:2] for r in extents(fs, f)] == [(0, 3), (3, 1)]  # the tail sector rewritten
    assert fs.getattr(f).blocks == 4 * SECTOR // 512
    fs.setattr(f, SetAttr(size=BLOCK))  # the bytes past the cut come back as zeros
    expected = data[: 3 * SECTOR + 100] + bytes(BLOCK - 3 * SECTOR - 100)
    assert read_all(fs, f) == expected
    fs = env.reopen()
    assert read_all(fs, f) == expected
    check_clean(env)


def test_fsck_finds_overlapping_and_malformed_extents(env):
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f", os.urandom(2 * BLOCK))
    g = mkfile(fs, ROOT_INODE, b"g", os.urandom(BLOCK))
    fs.commit()
    ((_s, n, a0),) = extents(fs, f)
    fs.db.change("INSERT INTO extents (inode, sector, nsect, addr, csums) VALUES (?, 3, 2, ?, ?)",
                 (f, a0 + 3, bytes(16)))  # overlaps the first extent in the file
    fs.db.change("UPDATE extents SET csums=? WHERE inode=?", (bytes(8), g))
    fs.db.change("INSERT INTO extents (inode, sector, nsect, addr, csums) VALUES (?, ?, 2, ?, ?)",
                 (g, GROUP_SECTORS - 1, a0, bytes(16)))  # crosses a group boundary
    fs.db.commit()
    report = fsck.check(env.db, env.vol)
    text = "\n".join(report.problems)
    assert "overlaps the extent before it" in text and "malformed checksums" in text
    assert "impossible shape" in text
    assert f in report.damaged_files and g in report.damaged_files
    report = fsck.check(env.db, env.vol, repair=True)
    assert fsck.check(env.db, env.vol).clean
    assert [r[:2] for r in extents(fs, f)] == [(0, n)]
    assert extents(fs, g) == []


# --- format 2 -------------------------------------------------------------------------------


def to_format_2(env: Env, ino: int) -> None:
    """Rewrite the database as format 2 left it: one row and one checksum per 64 KiB block.

    The file's extents must be whole blocks (and a short tail), as format 2 stored them."""
    fs = env.fs
    rows = []
    for sector, nsect, addr in extents(fs, ino):
        assert sector % 16 == 0
        for at in range(sector, sector + nsect, 16):  # one row per 64 KiB block
            n = min(16, sector + nsect - at)
            where = addr + at - sector
            data = fs.volume.read(where * SECTOR, n * SECTOR)
            rows.append((ino, at // 16, where, n, block_checksum(data, ino, at // 16)))
    env.close()
    db = MetaDB(env.meta)
    db.execute("CREATE TABLE blocks (inode INTEGER NOT NULL, blkno INTEGER NOT NULL, "
               "addr INTEGER NOT NULL, nsect INTEGER NOT NULL, csum INTEGER NOT NULL, "
               "PRIMARY KEY (inode, blkno)) WITHOUT ROWID")
    db.changemany("INSERT INTO blocks VALUES (?, ?, ?, ?, ?)", rows)
    db.execute("DROP TABLE extents")
    db.set_setting("format", 2)
    db.commit()
    db.close()


def test_format_2_blocks_are_read_checked_and_split(env):
    fs = env.fs
    data = bytearray(os.urandom(3 * BLOCK + 5000))
    f = mkfile(fs, ROOT_INODE, b"f", bytes(data))
    fs.commit()
    to_format_2(env, f)
    fs = env.open()
    assert fs.db.setting("format") == FORMAT_VERSION == 3
    legacy = list(fs.db.rows("SELECT sector, nsect FROM extents WHERE inode=? AND csums IS NULL "
                             "ORDER BY sector", (f,)))
    assert legacy == [(0, 16), (16, 16), (32, 16), (48, 2)]
    assert read_all(fs, f) == bytes(data)
    assert fs.read(f, BLOCK + 7 * SECTOR + 3, 10) == bytes(data[BLOCK + 7 * SECTOR + 3 :][:10])
    check_clean(env)
    # A one-sector rewrite gives the block's rows sector checksums; a truncate splits another.
    fs.write(f, BLOCK + 2 * SECTOR, b"z" * SECTOR)
    data[BLOCK + 2 * SECTOR : BLOCK + 3 * SECTOR] = b"z" * SECTOR
    fs.setattr(f, SetAttr(size=2 * BLOCK + 100))
    del data[2 * BLOCK + 100 :]
    fs.commit()
    assert [r[:2] for r in extents(fs, f)] == [(0, 16), (16, 2), (18, 1), (19, 13), (32, 1)]
    assert fs.db.value("SELECT count(*) FROM extents WHERE csums IS NULL") == 1  # block 0
    assert read_all(fs, f) == bytes(data)
    check_clean(env)
    fs = env.reopen()
    assert read_all(fs, f) == bytes(data)
    # Damage inside a format-2 row: the whole row is checked, so any read of it is EIO.
    addr = fs.db.value("SELECT addr FROM extents WHERE inode=? AND sector=0", (f,))
    fs.volume.write((addr + 9) * SECTOR, os.urandom(SECTOR))
    assert errno_of(fs.read, f, 0, 10) == errno.EIO
    report = fsck.check(env.db, env.vol, verify_data=True)
    assert f in report.damaged_files



def test_big_write_into_block_sized_holes(env):
    """Free space only in block-sized pieces: a 1 MiB write that was accepted is stored in
    those pieces (space is promised block by block, so no larger free extent is needed)."""
    fs = env.fs
    files = []
    with pytest.raises(FSError) as exc:
        while True:
            files.append(mkfile(fs, ROOT_INODE, b"f%d" % len(files), os.urandom(BLOCK)))
    assert exc.value.errno == errno.ENOSPC
    for k in range(0, len(files) - 1, 2):
        fs.unlink(ROOT_INODE, b"f%d" % k)
    fs.commit()
    # As much as statfs says is free: more than any free extent holds, so it goes in pieces.
    data = os.urandom(fs.statfs()["bavail"] * SECTOR // BLOCK * BLOCK)
    assert len(data) >= 1 << 20
    g = mkfile(fs, ROOT_INODE, b"big", data)
    fs.commit()
    assert read_all(fs, g) == data
    assert len(extents(fs, g)) > 1  # in pieces
    check_clean(env)


def test_space_fragmented_by_small_rewrites_stays_usable(env):
    """Copy-on-write of every other sector leaves free space in one-sector fragments: what
    statfs reports free can still be written, to the last block, and reads back."""
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f")
    size = fs.statfs()["bavail"] * SECTOR * 3 // 4 // BLOCK * BLOCK
    fs.write(f, 0, os.urandom(size))
    fs.commit()
    for off in range(0, size, 2 * SECTOR):
        fs.write(f, off, os.urandom(SECTOR))
    fs.commit()
    avail = fs.statfs()["bavail"] * SECTOR
    assert avail >= size // 4  # the fragments count as free, as they are
    data = os.urandom(avail // BLOCK * BLOCK)
    g = mkfile(fs, ROOT_INODE, b"g", data)  # no ENOSPC: fragments are used
    fs.commit()
    assert read_all(fs, g) == data
    assert min(n for _s, n, _a in extents(fs, g)) < BLOCK // SECTOR  # some went in fragments
    with pytest.raises(FSError) as exc:  # and now it really is full
        fs.write(g, len(data), os.urandom(2 * BLOCK))
    assert exc.value.errno == errno.ENOSPC
    assert read_all(fs, g) == data
    check_clean(env)


def test_full_filesystem_still_refreshes_its_metadata_copy(env):
    """File data stops short of the room kept for the metadata copy, so a full filesystem
    can still write a fresh copy (as at every unmount)."""
    fs = env.fs
    for i in range(3000):  # a database of a few hundred KiB: more than any slack
        mkfile(fs, ROOT_INODE, b"empty-%04d-" % i + b"x" * 100)
    fs.commit()
    n = 0
    with pytest.raises(FSError) as exc:
        while True:
            mkfile(fs, ROOT_INODE, b"f%d" % n, os.urandom(3 * BLOCK + 100))
            n += 1
    assert exc.value.errno == errno.ENOSPC
    fs.commit()
    before = latest_copy(env.vol)
    info = write_copy(fs)
    got = latest_copy(env.vol)
    assert got is not None and got[0].generation == info.generation
    assert before is None or info.generation > before[0].generation
    check_clean(env)
