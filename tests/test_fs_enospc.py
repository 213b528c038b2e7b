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
