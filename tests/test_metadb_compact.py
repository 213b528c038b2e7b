"""The metadata database gives its free pages back: deleting a large tree shrinks the database
file, the metadata copy on the volume and the room held for the next copy."""

from __future__ import annotations

import os
import shutil

import apsw
import pytest
import test_vfs_unit
from mountutil import mounted_warehouse
from test_extents import check_clean
from test_vfs_unit import mkfile, names

from vfs import metadb
from vfs.attrs import ROOT_INODE
from vfs.metacopy import latest_copy, write_copy
from vfs.metadb import COMPACT_MIN_FREE, INCREMENTAL_VACUUM, MetaDB


@pytest.fixture
def env(tmp_path):
    """A filesystem on a raidz2 volume that can hold a copy of a database of several MiB
    (new names get ENOSPC where it could not), reopenable."""
    e = test_vfs_unit.Env(tmp_path, rows=256)
    yield e
    if e.fs is not None:
        e.close()

LONG = b"x" * 200  # long names fill pages fast


def fill(fs, dirs: int, files: int) -> None:
    """`dirs` directories of `files` empty files with long names, committed."""
    for d in range(dirs):
        ino = fs.mkdir(ROOT_INODE, b"d%d" % d, 0o755, test_vfs_unit.ROOT).ino
        for i in range(files):
            mkfile(fs, ino, b"%05d-" % i + LONG)
        fs.commit()


def empty(fs, dirs: int, files: int) -> None:
    """Delete what `fill` made, committing after each directory."""
    for d in range(dirs):
        ino = fs.lookup(ROOT_INODE, b"d%d" % d).ino
        for i in range(files):
            fs.unlink(ino, b"%05d-" % i + LONG)
        fs.rmdir(ROOT_INODE, b"d%d" % d)
        fs.commit()


def pages(fs) -> tuple[int, int]:
    return fs.db.value("PRAGMA page_count"), fs.db.value("PRAGMA freelist_count")


def test_deleting_a_large_tree_shrinks_database_copy_and_reserve(env):
    fs = env.fs
    bfree_start = fs.statfs()["bfree"]
    fill(fs, 10, 1000)
    full, _free = pages(fs)
    assert full > 2000  # several MiB of names and their indexes
    bfree_full = fs.statfs()["bfree"]
    empty(fs, 10, 1000)
    total, free = pages(fs)
    assert total < full // 8, (total, full)
    assert free < COMPACT_MIN_FREE
    # The room held for the next metadata copy follows the database down.
    assert fs.statfs()["bfree"] > bfree_full
    assert bfree_start - fs.statfs()["bfree"] < (bfree_start - bfree_full) // 4
    info = write_copy(fs)
    assert info.length == total * 4096 < full * 4096 // 8
    got = latest_copy(env.vol)
    assert got is not None and got[0].generation == info.generation
    assert fs.db.integrity_errors() == []
    check_clean(env)
    fs = env.reopen()  # closing checkpoints the log into the file, which shrinks
    assert os.path.getsize(env.meta) == total * 4096
    assert names(fs, ROOT_INODE) == [b".", b".."]
    check_clean(env)


def test_a_few_free_pages_are_kept_for_reuse(env):
    fs = env.fs
    fill(fs, 1, 300)
    mkfile(fs, ROOT_INODE, b"keep")
    fs.commit()
    total, _ = pages(fs)
    for i in range(40):
        fs.unlink(fs.lookup(ROOT_INODE, b"d0").ino, b"%05d-" % i + LONG)
    fs.commit()
    after, free = pages(fs)
    assert after == total and 0 < free < COMPACT_MIN_FREE
    assert fs.db.compact() == 0


def test_a_database_made_without_auto_vacuum_is_rebuilt_once_then_compacts(env):
    fs = env.fs
    fill(fs, 4, 1500)
    env.close()
    conn = apsw.Connection(env.meta)  # as databases made before incremental auto-vacuum were
    conn.execute("PRAGMA auto_vacuum=0")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchall()[0][0] == 0
    conn.close()
    fs = env.open()
    assert fs.db.value("PRAGMA auto_vacuum") == INCREMENTAL_VACUUM
    assert names(fs, ROOT_INODE) == [b".", b"..", b"d0", b"d1", b"d2", b"d3"]
    assert len(names(fs, fs.lookup(ROOT_INODE, b"d2").ino)) == 1502
    check_clean(env)
    full, _ = pages(fs)
    empty(fs, 4, 1500)
    assert pages(fs)[0] < full // 4
    check_clean(env)


def test_a_new_database_is_made_compactable_from_the_start(tmp_path):
    db = MetaDB(str(tmp_path / "meta.db"), create=True)
    try:
        assert db.value("PRAGMA auto_vacuum") == INCREMENTAL_VACUUM
    finally:
        db.close()


def test_df_and_meta_db_shrink_after_rm_rf_on_a_mount(tmp_path):
    """Through the mount: deleting a large tree gives `df` its space back at the next commit
    (an fsync), and meta.db on the host is small again after unmount."""
    with mounted_warehouse(tmp_path) as m:
        def used() -> int:
            st = os.statvfs(m.mountpoint)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        def commit() -> None:
            fd = os.open(m.path("marker"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)

        commit()
        empty = used()
        for d in range(4):
            os.mkdir(m.path(f"d{d}"))
            for i in range(1000):
                open(m.path(f"d{d}", f"{i:05d}-" + "y" * 200), "wb").close()
        commit()
        full = used()
        assert full - empty > 4 << 20  # the room held for the next metadata copy grew
        for d in range(4):
            shutil.rmtree(m.path(f"d{d}"))
        commit()
        assert used() - empty < (full - empty) // 4
        peak = full - empty
    assert os.path.getsize(os.path.join(m.warehouse, "meta.db")) < peak // 4


def test_the_write_ahead_log_is_cut_back_after_a_large_transaction(tmp_path, monkeypatch):
    monkeypatch.setattr(metadb, "WAL_KEEP_BYTES", 1 << 20)
    e = test_vfs_unit.Env(tmp_path)
    try:
        fill(e.fs, 1, 8000)  # one transaction of several MiB
        wal = e.meta + "-wal"
        assert os.path.getsize(wal) > 4 << 20
        for i in range(3):  # later small transactions reuse the log from its start
            mkfile(e.fs, ROOT_INODE, b"small-%d" % i)
            e.fs.commit()
        assert os.path.getsize(wal) <= 1 << 20
    finally:
        e.close()


def test_pages_kept_for_want_of_disk_space_are_reported_once(env, monkeypatch, caplog):
    # Compaction is tried at every commit; a disk too full to move pages said so at INFO each
    # time (every few seconds on a mount), and routine compactions filled the log too.
    fs = env.fs
    fill(fs, 2, 1000)
    measure = fs.db._measure_room

    def no_room() -> None:
        measure()
        fs.db._room = 0

    monkeypatch.setattr(fs.db, "_measure_room", no_room)
    caplog.set_level("DEBUG", logger="vfs.metadb")
    empty(fs, 2, 1000)
    for _ in range(3):
        assert fs.db.compact() == 0
    kept = [r for r in caplog.records if "free pages kept" in r.getMessage()]
    assert len(kept) >= 4
    assert [r.levelname for r in kept] == ["INFO"] + ["DEBUG"] * (len(kept) - 1)
    monkeypatch.setattr(fs.db, "_measure_room", measure)
    caplog.clear()
    assert fs.db.compact() > 0
    assert [r.levelname for r in caplog.records if "gave" in r.getMessage()] == ["DEBUG"]
    fill(fs, 2, 1000)
    monkeypatch.setattr(fs.db, "_measure_room", no_room)
    caplog.clear()
    empty(fs, 2, 1000)
    kept = [r for r in caplog.records if "free pages kept" in r.getMessage()]
    assert kept and kept[0].levelname == "INFO"  # said again once it happens anew
