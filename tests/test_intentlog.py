"""The intent log: an fsync's small writes committed to the metadata database instead of a
flush of the volume, replayed after a crash that lost them on the volume, read through by a
read-only open and by fsck, and emptied by the next ordinary commit."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vfs_unit import ROOT, Env
from volhelpers import build, open_vol, rand_bytes, restore, snapshot

import vfs.intentlog
from vfs import fsck
from vfs.attrs import ROOT_INODE
from vfs.fs import Filesystem
from vfs.intentlog import IntentLog
from vfs.metadb import MetaDB


def _rows(db: MetaDB) -> int:
    if db.value("SELECT 1 FROM sqlite_master WHERE name='intent_log'") is None:
        return 0
    return db.value("SELECT count(*) FROM intent_log")


def _read_all(fs: Filesystem, ino: int) -> bytes:
    size = fs.getattr(ino).size
    return bytes(fs.read(ino, 0, size))


@pytest.fixture
def crashed(tmp_path):
    """A file whose last writes an fsync put only in the intent log, after a crash that lost
    every volume write since the last flush: (env, inode, the bytes the file must hold)."""
    env = Env(tmp_path)
    fs = env.fs
    ino = fs.create(ROOT_INODE, b"db", 0o644, os.O_RDWR, ROOT).ino
    old = rand_bytes(1, 300_000)
    fs.write(ino, 0, old)
    fs.commit()  # an ordinary commit: the volume is flushed
    assert _rows(env.db) == 0
    snapshot(env.paths, tmp_path / "durable")  # what the members hold for sure
    want = bytearray(old)
    for off, data in [(4096, rand_bytes(2, 3000)), (200_000, rand_bytes(3, 9000)),
                      (299_000, rand_bytes(4, 5000))]:  # the last one grows the file
        fs.write(ino, off, data)
        want[off:off + len(data)] = data
    fs.commit(log=True)  # what an fsync does
    assert _rows(env.db) > 0  # the new bytes are in the database...
    env.close(clean=False)  # ...and the process dies,
    restore(env.paths, tmp_path / "durable")  # with the power: the volume loses them
    yield env, ino, bytes(want)
    if env.fs is not None:
        env.close()


def test_a_crash_after_an_fsync_loses_nothing(crashed):
    env, ino, want = crashed
    fs = env.open()  # a read-write open writes the logged bytes to the volume again
    assert _rows(env.db) == 0
    assert _read_all(fs, ino) == want
    report = fsck.check(env.db, fs.volume, verify_data=True)
    assert report.clean, report.problems
    env.close()
    fs = env.open()
    assert _read_all(fs, ino) == want


def test_a_read_only_open_reads_through_the_log(crashed):
    env, ino, want = crashed
    vol = open_vol(env.paths, env.uuid)
    db = MetaDB(env.meta, read_only=True)
    fs = Filesystem(db, vol)
    assert _read_all(fs, ino) == want  # served through the rows, nothing written
    assert _rows(db) > 0
    report = fsck.check(db, fs.volume, verify_data=True)
    assert report.clean, report.problems
    db.close()
    vol.close(write=False)
    fs = env.open()  # the next read-write open writes them
    assert _rows(env.db) == 0
    assert _read_all(fs, ino) == want


def test_fsck_reads_through_or_replays_the_log(crashed):
    env, ino, want = crashed
    vol = open_vol(env.paths, env.uuid, read_only=True)
    db = MetaDB(env.meta)
    logged = IntentLog(vol, db)
    assert logged.read_through() > 0
    assert fsck.check(db, logged, verify_data=True).clean
    # Without the log, the lost bytes show as damage: what fsck must not report.
    assert not fsck.check(db, vol, verify_data=True).clean
    db.close()
    vol.close(write=False)
    vol = open_vol(env.paths, env.uuid)
    db = MetaDB(env.meta)
    assert IntentLog(vol, db).replay() > 0
    assert _rows(db) == 0
    assert fsck.check(db, vol, verify_data=True).clean
    db.close()
    vol.close()
    fs = env.open()
    assert _read_all(fs, ino) == want


def test_an_ordinary_commit_empties_the_log(tmp_path):
    env = Env(tmp_path)
    fs = env.fs
    ino = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT).ino
    fs.write(ino, 0, b"a" * 5000)
    fs.commit(log=True)
    assert _rows(env.db) > 0
    fs.write(ino, 5000, b"b" * 5000)
    fs.commit(log=True)  # adds only what is new
    rows = _rows(env.db)
    fs.commit()  # flushes the volume: the log is no longer needed
    assert _rows(env.db) == 0
    assert rows > 0
    assert _read_all(fs, ino) == b"a" * 5000 + b"b" * 5000
    env.close()


def test_much_unflushed_data_is_flushed_not_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(vfs.intentlog, "LOG_BYTES", 64 * 1024)
    env = Env(tmp_path)
    fs = env.fs
    ino = fs.create(ROOT_INODE, b"big", 0o644, os.O_RDWR, ROOT).ino
    data = rand_bytes(5, 200_000)
    fs.write(ino, 0, data)
    fs.commit(log=True)
    assert _rows(env.db) == 0  # more than the log takes: an ordinary commit
    fs.write(ino, 0, b"small")
    fs.commit(log=True)
    assert _rows(env.db) > 0  # the flush reset what the log counts
    env.close()
    fs = env.open()
    assert _read_all(fs, ino) == b"small" + data[5:]


def test_fsyncs_keep_the_write_ahead_log_bounded(tmp_path):
    """Commits reuse meta.db's write-ahead log once a checkpoint has copied it back, even
    while another thread's last query was answered: a statement left unfinished there kept the
    log from ever being reused, and it grew by every fsync for as long as the mount lived."""
    env = Env(tmp_path)
    fs = env.fs
    ino = fs.create(ROOT_INODE, b"db", 0o644, os.O_RDWR, ROOT).ino
    fs.write(ino, 0, rand_bytes(6, 4096))
    fs.commit()
    asked, done = threading.Event(), threading.Event()

    def reader() -> None:  # the session's reading thread: one lookup, then idle
        fs.getattr(ino)
        asked.set()
        done.wait(60)

    other = threading.Thread(target=reader)
    other.start()
    asked.wait(60)
    wal = env.meta + "-wal"
    for i in range(1500):  # a database's commits: a small write and an fsync each
        fs.write(ino, (i % 16) * 4096, rand_bytes(i, 4096))
        fs.commit(log=True)
        fs.getattr(ino)
    # A checkpoint (every 1,000 pages) lets the log start over: it stays near 4 MiB. Kept
    # from starting over, 1,500 such commits made it more than four times that.
    size = os.path.getsize(wal)
    done.set()
    other.join()
    assert size < 8 * 1024 * 1024
    env.close()
    assert _read_all(env.open(), ino)[:4096] == rand_bytes(1488, 4096)
    env.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60_000), st.integers(1, 12_000)),
                min_size=1, max_size=40))
def test_reads_of_unflushed_writes_match_the_volume(tmp_path_factory, steps):
    """Reads the log answers from the writes it remembers give the bytes the volume gives."""
    d = tmp_path_factory.mktemp("held")
    paths, uuid, _ = build(str(d / "members"), "raidz2", 5, chunk=65536, rows=4)
    vol = open_vol(paths, uuid)
    db = MetaDB(str(d / "meta.db"), create=True)
    log = IntentLog(vol, db)
    try:
        for n, (is_write, offset, length) in enumerate(steps):
            if is_write:
                log.write(offset, rand_bytes(n, length))
            else:
                assert bytes(log.read(offset, length)) == bytes(vol.read(offset, length))
        log.flush()
        log.forget()
        assert bytes(log.read(0, 72_000)) == bytes(vol.read(0, 72_000))
    finally:
        db.close()
        vol.close()


def test_a_small_commit_is_one_the_log_takes(tmp_path):
    """small_commit tells an fsync whether its commit would go into the intent log (so the
    session runs it at once) or flush the volume (so it runs in the worker): true after a few
    KiB, false once what waits for the volume passes LOG_BYTES, true again after a flush."""
    env = Env(tmp_path)
    fs = env.fs
    try:
        ino = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT).ino
        fs.commit()
        fs.write(ino, 0, rand_bytes(1, 8192))
        assert fs.small_commit()
        fs.commit(log=True)
        assert _rows(env.db) > 0 and fs.small_commit()
        fs.write(ino, 8192, rand_bytes(2, vfs.intentlog.LOG_BYTES))
        assert not fs.small_commit()
        fs.commit(log=True)  # too much for the log: the volume is flushed, the log emptied
        assert _rows(env.db) == 0 and fs.small_commit()
    finally:
        env.close()
