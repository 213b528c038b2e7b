"""A read-only mount (`-o ro`) serves everything and writes nothing to the warehouse."""

from __future__ import annotations

import errno
import hashlib
import os
import signal

import pytest
from mountutil import FsMount, daemon_pid, dwfs, force_unmount, make_warehouse
from posixutil import errno_of

from dwfs.config import load_config
from dwfs.warehouse import open_volume

pytestmark = pytest.mark.timeout(300)

# Written by every mount, read-only or not: the log, the lock, SQLite's shared-memory index.
NOT_DATA = ("dwfs.log", ".dwfs.lock", "meta.db-shm")


def snapshot(warehouse: str) -> dict[str, str]:
    """sha256 of every file of the warehouse that holds data or metadata."""
    out = {}
    for root, _dirs, files in os.walk(warehouse):
        for name in files:
            path = os.path.join(root, name)
            if name in NOT_DATA or (name == "meta.db-wal" and not os.path.getsize(path)):
                continue  # an empty write-ahead log is no change
            with open(path, "rb") as f:
                out[os.path.relpath(path, warehouse)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


@pytest.fixture
def prepared(tmp_path):
    """A warehouse holding files, a directory, a symlink, an attribute and a ghost, with one
    member's first data chunks corrupted after the last read-write mount."""
    m = FsMount(make_warehouse(tmp_path / "wh"), tmp_path / "mnt")
    source = tmp_path / "source"
    source.mkdir()
    (source / "far.txt").write_bytes(b"fetched on first read\n" * 100)
    big = os.urandom(3 << 20)
    try:
        m.mount()
        with open(m.path("big.bin"), "wb") as f:
            f.write(big)
        with open(m.path("small.txt"), "wb") as f:
            f.write(b"hello\n")
        os.mkdir(m.path("dir"))
        os.symlink("small.txt", m.path("link"))
        os.setxattr(m.path("small.txt"), "user.project", b"apollo")
        os.utime(m.path("small.txt"), (1_000_000_000, 1_000_000_000))  # atime due for update
        os.mkdir(m.path("ghosts"))
        dwfs("ghost", "import", str(source), m.path("ghosts"))
        m.umount()
        cfg = load_config(m.warehouse)
        vol = open_volume(cfg, read_only=True)
        offset = vol.geometry.data_offset
        vol.close()
        with open(cfg.member_paths()[0], "r+b") as f:  # rows 0-15 of slot 0
            f.seek(offset)
            f.write(os.urandom(16 * 65536))
        yield m, big
    finally:
        force_unmount(m.mountpoint, m.warehouse)


def test_read_only_mount_serves_everything_and_writes_nothing(prepared):
    m, big = prepared
    before = snapshot(m.warehouse)
    m.mount("ro")
    with open(m.path("big.bin"), "rb") as f:
        assert f.read() == big  # corrupt chunks reconstructed, not rewritten
    with open(m.path("small.txt"), "rb") as f:
        assert f.read() == b"hello\n"
    assert sorted(os.listdir(m.mountpoint)) == ["big.bin", "dir", "ghosts", "link", "small.txt"]
    assert os.readlink(m.path("link")) == "small.txt"
    assert os.getxattr(m.path("small.txt"), "user.project") == b"apollo"
    assert os.stat(m.path("ghosts", "far.txt")).st_size == 2200
    # A ghost's content would have to be stored: refused as clearly as a write.
    assert errno_of(lambda: open(m.path("ghosts", "far.txt"), "rb").read()) == errno.EROFS
    assert errno_of(os.open, m.path("new"), os.O_CREAT | os.O_WRONLY, 0o644) == errno.EROFS
    assert errno_of(os.open, m.path("small.txt"), os.O_WRONLY) == errno.EROFS
    assert errno_of(os.mkdir, m.path("d2")) == errno.EROFS
    assert errno_of(os.truncate, m.path("big.bin"), 0) == errno.EROFS
    assert errno_of(os.setxattr, m.path("small.txt"), "user.x", b"1") == errno.EROFS
    assert errno_of(os.unlink, m.path("small.txt")) == errno.EROFS
    # Control requests that would write are refused by the daemon; status still answers.
    r = dwfs("scrub", m.warehouse, "--repair", check=False)
    assert r.returncode != 0 and "read-only" in r.stderr, r.stderr
    assert '"state"' in dwfs("status", m.warehouse, "--json").stdout
    assert "errors" in dwfs("scrub", m.warehouse, "--json", check=False).stdout  # (found some)
    assert not os.path.exists(os.path.join(m.warehouse, "last-scrub.json"))  # nor recorded
    m.umount()
    assert snapshot(m.warehouse) == before
    # The next read-write mount finds it all as it was (and may now repair and fetch).
    m.mount()
    with open(m.path("big.bin"), "rb") as f:
        assert f.read() == big
    with open(m.path("ghosts", "far.txt"), "rb") as f:
        assert f.read() == b"fetched on first read\n" * 100
    m.umount()
    dwfs("fsck", m.warehouse)  # exits non-zero on any finding


def test_fsck_without_repair_writes_nothing(prepared):
    """`dwfs fsck --verify-data` reads every file through the corrupt chunks and reports, but
    mends nothing on the members; `--repair` then rewrites the chunks it reconstructs."""
    m, big = prepared
    before = snapshot(m.warehouse)
    dwfs("fsck", m.warehouse, "--verify-data", check=False)
    assert snapshot(m.warehouse) == before
    done = dwfs("fsck", m.warehouse, "--verify-data", "--repair", check=False)
    assert done.returncode == 1 and "rewritten from redundancy" in done.stdout  # corrected
    member0 = os.path.relpath(load_config(m.warehouse).member_paths()[0], m.warehouse)
    assert snapshot(m.warehouse)[member0] != before[member0]  # the corrupt chunks, mended
    m.mount("ro")
    with open(m.path("big.bin"), "rb") as f:
        assert f.read() == big
    m.umount()


def test_read_only_mount_after_a_crash_with_a_logged_write_closes_cleanly(tmp_path):
    """kill -9 right after an fsync whose write went into the intent log (not yet on the
    volume); a read-only mount reads through the log, answers fsync, and closes cleanly
    (it used to try to empty the log at unmount and fail on its read-only database) without
    writing; the next read-write mount puts the write on the volume."""
    m = FsMount(make_warehouse(tmp_path / "wh"), tmp_path / "mnt")
    try:
        m.mount()
        with open(m.path("f"), "wb") as f:
            f.write(b"before\n")
        m.umount()
        m.mount()
        fd = os.open(m.path("f"), os.O_WRONLY)
        os.pwrite(fd, b"BEFORE\n", 0)
        os.fsync(fd)  # a few bytes: logged with the metadata, the volume not flushed
        os.close(fd)
        os.kill(daemon_pid(m.warehouse), signal.SIGKILL)
        force_unmount(m.mountpoint, m.warehouse)
        before = snapshot(m.warehouse)
        m.mount("ro")
        with open(os.path.join(m.warehouse, "dwfs.log"), errors="replace") as log:
            assert "1 logged writes not yet on the volume" in log.read()[-3000:]
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"BEFORE\n"
        fd = os.open(m.path("f"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        m.umount()  # asserts the daemon said it closed cleanly
        assert snapshot(m.warehouse) == before
        m.mount()
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"BEFORE\n"
        m.umount()
        assert dwfs("fsck", m.warehouse, check=False).returncode == 0
    finally:
        m.cleanup()
