"""A full volume must not lose data that writes already acknowledged (vfs level, no mount)."""

from __future__ import annotations

import errno
import os

import pytest
from mountutil import make_warehouse

from dwfs.config import load_config
from dwfs.warehouse import meta_path, open_volume
from vfs import filedata
from vfs.attrs import ROOT_INODE, Caller
from vfs.fs import Filesystem
from vfs.metacopy import latest_copy, write_copy
from vfs.metadb import MetaDB

BLOCK = filedata.BLOCK
ME = Caller(0, 0)


@pytest.fixture
def fs(tmp_path):
    cfg = load_config(make_warehouse(tmp_path / "wh", level="raid1", devices=2, size="8M"))
    volume = open_volume(cfg)
    f = Filesystem(MetaDB(meta_path(cfg)), volume)
    yield f
    f.close()
    f.db.close()
    volume.close()


def _new(fs: Filesystem, name: bytes) -> int:
    return fs.create(ROOT_INODE, name, 0o644, os.O_RDWR, ME).ino


def _fill(fs: Filesystem) -> None:
    """Write a file until the volume is full (less than one block free)."""
    ino = _new(fs, b"fill")
    off = 0
    for chunk in (1 << 20, BLOCK):
        while True:
            try:
                fs.write(ino, off, os.urandom(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            off += chunk
    fs.release(ino)


def test_enospc_keeps_the_buffered_start_of_a_block(fs):
    a = _new(fs, b"a")
    head = os.urandom(60_000)
    fs.write(a, 0, head)  # acknowledged, still buffered (part of a block)
    _fill(fs)
    with pytest.raises(OSError) as exc:
        fs.write(a, 60_000, os.urandom(8000))  # completes the block: no room to store it
    assert exc.value.errno == errno.ENOSPC
    assert fs.getattr(a).size == 60_000
    assert fs.read(a, 0, 60_000) == head


def test_enospc_in_write_out_keeps_what_was_stored(fs, monkeypatch):
    """A write that pushes the buffers over their limit stores other files' blocks first; if
    that runs out of space part way, the blocks already stored must stay in the block map."""
    d = _new(fs, b"d")
    fs.write(d, 0, os.urandom(3 * BLOCK))
    _fill(fs)
    fs.unlink(ROOT_INODE, b"d")
    fs.release(d)
    fs.commit()  # d's space is free again: room for a few blocks, not for all
    a, c = _new(fs, b"a"), _new(fs, b"c")
    # Each piece covers 15 of a block's 16 sectors: only written sectors are stored.
    pieces = {(a, 100): os.urandom(60_000), (a, BLOCK + 100): os.urandom(60_000)}
    for k in range(8):
        pieces[(c, k * BLOCK + 100)] = os.urandom(60_000)
    monkeypatch.setattr(filedata, "DIRTY_LIMIT", 5 * BLOCK + BLOCK // 2)
    failed = []
    for (ino, off), data in pieces.items():
        try:
            fs.write(ino, off, data)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            failed.append((ino, off))
    for (ino, off), data in pieces.items():
        if (ino, off) not in failed:
            assert fs.read(ino, off, len(data)) == data, (ino, off)
    assert failed, "the volume never ran full: the test proves nothing"
    # Buffered writes hold their space: making them durable cannot run out of it.
    fs.commit()
    for (ino, off), data in pieces.items():
        if (ino, off) not in failed:
            assert fs.read(ino, off, len(data)) == data, (ino, off)
    # Removing a file gives the room back for what was refused.
    fs.unlink(ROOT_INODE, b"fill")
    for ino, off in failed:
        assert fs.write(ino, off, pieces[(ino, off)]) == len(pieces[(ino, off)])
    fs.commit()
    for (ino, off), data in pieces.items():
        assert fs.read(ino, off, len(data)) == data, (ino, off)


# --- metadata: the volume's copy of it, the disk under the database, a dropped transaction ---


def _names(fs: Filesystem) -> set[bytes]:
    names, cookie = set(), 0
    while batch := fs.readdir(ROOT_INODE, cookie, limit=100_000):
        names.update(e.name for e in batch)
        cookie = batch[-1].next_cookie
    return names - {b".", b".."}


def _make_until_full(fs: Filesystem, prefix: bytes, limit: int = 100_000) -> tuple[list, int]:
    """Files with a 3,000-byte attribute each (about 8 KiB of metadata) until a call fails;
    returns the names whose file and attribute were both made, and the errno."""
    made = []
    for i in range(limit):
        name = prefix + b"%06d" % i
        try:
            ino = fs.mknod(ROOT_INODE, name, 0o100644, 0, ME).ino
            fs.setxattr(ino, b"user.big", b"x" * 3000)
        except OSError as exc:
            return made, exc.errno
        made.append(name)
    raise AssertionError(f"{limit} files made without running out of room: proves nothing")


def _reopen(fs: Filesystem, cfg) -> Filesystem:
    fs.close()
    fs.db.close()
    return Filesystem(MetaDB(meta_path(cfg)), fs.volume.volume)


def _make(fs: Filesystem, prefix: bytes, n: int) -> None:
    for i in range(n):
        ino = fs.mknod(ROOT_INODE, prefix + b"%06d" % i, 0o100644, 0, ME).ino
        fs.setxattr(ino, b"user.big", b"x" * 3000)


def test_metadata_stops_growing_where_the_volume_could_not_hold_its_copy(tmp_path):
    """The database is copied to the volume; on a small volume, new files and attributes get
    ENOSPC (and `df -i` no free inodes) before that copy would no longer fit, however much
    room the database's own disk has. What was made stays, the copy is written, and removing
    files gives the room back."""
    cfg = load_config(make_warehouse(tmp_path / "wh", level="raid1", devices=2, size="8M"))
    volume = open_volume(cfg)
    fs = Filesystem(MetaDB(meta_path(cfg)), volume)
    try:
        made, code = _make_until_full(fs, b"f")
        assert code == errno.ENOSPC and len(made) > 100
        assert fs.statfs()["ffree"] == 0
        write_copy(fs)  # the next copy of the metadata still fits on the volume
        fs = _reopen(fs, cfg)
        names = _names(fs)
        assert set(made) <= names and len(names) - len(made) in (0, 1)  # (made, no attribute)
        for name in made[: len(made) // 2]:
            fs.unlink(ROOT_INODE, name)
        # The database gives its free pages back at the commit. The next copy (the daemon
        # makes one every few minutes) does not fit beside the large one: that one is given
        # up first, with a warning, and the new one is written.
        info = write_copy(fs)
        assert latest_copy(fs.volume.volume)[0].generation == info.generation
        assert fs.statfs()["ffree"] > 0
        _make(fs, b"g", 50)
        write_copy(fs)
    finally:
        fs.close()
        fs.db.close()
        volume.close()


def test_a_transaction_the_database_drops_stops_the_filesystem(tmp_path, caplog):
    """SQLite drops the whole open transaction when it cannot write it (a full disk or an I/O
    error in the middle): what the filesystem holds in memory then no longer matches the
    database. It must stop (EIO for every call, no commit of anything after), not go on
    writing into a transaction of its own; the next open finds the last commit."""
    cfg = load_config(make_warehouse(tmp_path / "wh", level="raid1", devices=2, size="8M"))
    volume = open_volume(cfg)
    fs = Filesystem(MetaDB(meta_path(cfg)), volume)
    try:
        kept = _new(fs, b"kept")
        fs.write(kept, 0, b"durable")
        fs.release(kept)
        fs.commit()
        lost = _new(fs, b"lost")
        fs.write(lost, 0, b"gone")
        fs.db.conn.execute("ROLLBACK")  # what SQLite does after such an error
        for call, args in ((fs.mkdir, (ROOT_INODE, b"d", 0o755, ME)),
                           (fs.getattr, (kept,)), (fs.commit, ()),
                           (fs.write, (lost, 0, b"more"))):
            with pytest.raises(OSError) as exc:
                call(*args)
            assert exc.value.errno == errno.EIO, call
        assert "dropped its open transaction" in caplog.text
        assert fs.stopped is not None and "mkdir" in fs.stopped  # (dwfs status shows it)
        assert not fs.needs_commit()
        fs = _reopen(fs, cfg)  # closing commits nothing
        assert _names(fs) == {b"kept"}
        assert fs.read(fs.lookup(ROOT_INODE, b"kept").ino, 0, 100) == b"durable"
    finally:
        fs.close()
        fs.db.close()
        volume.close()
