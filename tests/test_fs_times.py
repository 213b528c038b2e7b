"""Which times each operation changes, on the mount and on ext4 side by side: for every
operation, whether the atime, mtime and ctime of the object and of its directory moved must
agree (the values themselves differ: the two run a moment apart)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import time

import pytest
from mountutil import dwfs, make_warehouse, scratch_mount
from posixutil import (
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    FALLOC_ZERO_RANGE,
    birth_time,
    fallocate,
)

TICK = 0.012  # ext4 takes times from a coarse clock: wait longer than one tick between steps


@pytest.fixture(scope="module")
def roots():
    with scratch_mount("dwfs-times-") as (m, base):
        ref = os.path.join(base, "ref")
        os.mkdir(ref)
        yield ref, m


def _with_fd(flags: int, fn):
    def op(p: str) -> None:
        fd = os.open(p, flags)
        try:
            fn(fd)
        finally:
            os.close(fd)
    return op


def _falloc(mode: int, offset: int, length: int):
    return _with_fd(os.O_RDWR, lambda fd: fallocate(fd, mode, offset, length))


def _listing(p: str) -> None:
    os.listdir(p)


# (name, what it is done to, operation on the path). "file" is a 100,000-byte file "d/f" with a
# second link "d/g"; "dir" is "d/sub" with a file in it; "link" is a symlink "d/l".
CASES = [
    ("write", "file", _with_fd(os.O_WRONLY, lambda fd: os.pwrite(fd, b"x", 10))),
    ("write nothing", "file", _with_fd(os.O_WRONLY, lambda fd: os.write(fd, b""))),
    ("append", "file", _with_fd(os.O_WRONLY | os.O_APPEND, lambda fd: os.write(fd, b"y"))),
    ("read", "file", _with_fd(os.O_RDONLY, lambda fd: os.read(fd, 10))),
    ("open and close", "file", _with_fd(os.O_RDWR, lambda fd: None)),
    ("O_TRUNC", "file", _with_fd(os.O_WRONLY | os.O_TRUNC, lambda fd: None)),
    ("truncate shorter", "file", lambda p: os.truncate(p, 500)),
    ("truncate longer", "file", lambda p: os.truncate(p, 500_000)),
    ("truncate same size", "file", lambda p: os.truncate(p, 100_000)),
    ("fsync", "file", _with_fd(os.O_RDWR, os.fsync)),
    ("fallocate", "file", _falloc(0, 0, 4096)),
    ("fallocate grows", "file", _falloc(0, 0, 200_000)),
    ("fallocate keep size", "file", _falloc(FALLOC_KEEP_SIZE, 150_000, 4096)),
    ("punch hole", "file", _falloc(FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 4096, 8192)),
    ("zero range", "file", _falloc(FALLOC_ZERO_RANGE, 4096, 8192)),
    ("chmod", "file", lambda p: os.chmod(p, 0o640)),
    ("chmod to the same", "file", lambda p: os.chmod(p, 0o644)),
    ("chown to the same", "file", lambda p: os.chown(p, 0, 0)),
    ("chown nothing", "file", lambda p: os.chown(p, -1, -1)),
    ("utime now", "file", lambda p: os.utime(p)),
    ("setxattr", "file", lambda p: os.setxattr(p, "user.a", b"1")),
    ("removexattr", "file", lambda p: os.removexattr(p, "user.keep")),
    ("getxattr", "file", lambda p: os.getxattr(p, "user.keep")),
    ("link", "file", lambda p: os.link(p, p + "-new")),
    ("unlink another name", "file", lambda p: os.unlink(os.path.join(os.path.dirname(p), "g"))),
    ("rename", "file", lambda p: os.rename(p, p + "-moved")),
    ("rename onto another name", "file",
     lambda p: os.rename(os.path.join(os.path.dirname(p), "g"), p)),
    ("mmap write", "file", _with_fd(os.O_RDWR, lambda fd: _mmap_write(fd))),
    ("list", "dir", _listing),
    ("create in", "dir", lambda p: os.close(os.open(p + "/new", os.O_CREAT | os.O_WRONLY))),
    ("mkdir in", "dir", lambda p: os.mkdir(p + "/newdir")),
    ("mknod in", "dir", lambda p: os.mknod(p + "/fifo", stat.S_IFIFO | 0o600)),
    ("symlink in", "dir", lambda p: os.symlink("x", p + "/sl")),
    ("unlink in", "dir", lambda p: os.unlink(p + "/inner")),
    ("rename within", "dir", lambda p: os.rename(p + "/inner", p + "/inner2")),
    ("rename dir", "dir", lambda p: os.rename(p, p + "-moved")),
    ("rename dir into another", "dir",
     lambda p: os.rename(p, os.path.join(os.path.dirname(p), "other", "sub"))),
    ("rmdir", "dir", lambda p: (os.unlink(p + "/inner"), os.rmdir(p))),
    ("chmod dir", "dir", lambda p: os.chmod(p, 0o700)),
    ("setxattr dir", "dir", lambda p: os.setxattr(p, "user.a", b"1")),
    ("readlink", "link", os.readlink),
    ("utime link", "link", lambda p: os.utime(p, follow_symlinks=False)),
    ("rename link", "link", lambda p: os.rename(p, p + "-moved")),
]


def _mmap_write(fd: int) -> None:
    import mmap
    with mmap.mmap(fd, 4096) as m:
        m[0:1] = b"m"
        m.flush()


def _build(root: str) -> None:
    d = os.path.join(root, "d")
    os.mkdir(d)
    with open(os.path.join(d, "f"), "wb") as f:
        f.write(os.urandom(100_000))
    os.chmod(os.path.join(d, "f"), 0o644)
    os.setxattr(os.path.join(d, "f"), "user.keep", b"k")
    os.link(os.path.join(d, "f"), os.path.join(d, "g"))
    os.symlink("f", os.path.join(d, "l"))
    os.mkdir(os.path.join(d, "sub"))
    os.mkdir(os.path.join(d, "other"))
    with open(os.path.join(d, "sub", "inner"), "wb") as f:
        f.write(b"i")


def _times(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def _changes(root: str, target: str, op) -> dict[str, str]:
    """Run `op` on the target in a fresh tree under `root`: which times of the target, its
    directory and the directory above moved."""
    _build_fresh(root)
    path = os.path.join(root, "d", {"file": "f", "dir": "sub", "link": "l"}[target])
    watched = {"object": path, "directory": os.path.dirname(path), "top": root}
    time.sleep(TICK)
    # atime is relatime's: set it far in the past, where any read moves it
    for p in watched.values():
        st = os.lstat(p)
        os.utime(p, ns=(1, st.st_mtime_ns), follow_symlinks=False)
    time.sleep(TICK)
    before = {k: _times(p) for k, p in watched.items()}
    time.sleep(TICK)
    op(path)
    after = {k: _times(p) for k, p in watched.items()}
    out = {}
    for k in watched:
        b, a = before[k], after[k]
        if a is None:
            out[k] = "gone"
            continue
        out[k] = " ".join(name for name, x, y in zip("amc", b, a, strict=True) if x != y) or "-"
    return out


@pytest.mark.parametrize("name,target,op", CASES, ids=[c[0] for c in CASES])
def test_times_move_as_on_ext4(roots, name, target, op):
    ref, m = roots
    want = _changes(ref, target, op)
    got = _changes(m.mountpoint, target, op)
    assert got == want, f"{name}: mount {got}, ext4 {want}"


def test_noatime_and_nodiratime(roots):
    """Mounted with noatime, nothing a read does moves atime; with nodiratime, listing a
    directory does not (reading a file still does); mounted without, both do."""
    _ref, m = roots
    for options, file_moves, dir_moves in ((("noatime",), False, False),
                                           (("nodiratime",), True, False), ((), True, True)):
        m.umount()
        m.mount(*options)
        _build_fresh(m.mountpoint)
        f, d = m.path("d", "f"), m.path("d")
        for p in (f, d):
            os.utime(p, ns=(1, os.lstat(p).st_mtime_ns))
        with open(f, "rb") as fh:
            fh.read()
        os.listdir(d)
        assert (os.stat(f).st_atime_ns != 1) == file_moves, options
        assert (os.stat(d).st_atime_ns != 1) == dir_moves, options


def _build_fresh(root: str) -> None:
    shutil.rmtree(os.path.join(root, "d"), ignore_errors=True)
    _build(root)


def test_birth_times(tmp_path, fs_mount):
    """statx's birth time: when the inode was made, for every kind of inode (imported ghosts:
    the import), unchanged by writes, chmod, rename, links and utimensat, and kept across a
    remount. Inodes of a database from before birth times show none (`stat` prints "-"), also
    on a read-only mount that cannot add the column; a read-write mount adds it for new ones."""
    wh = make_warehouse(tmp_path / "wh", level="raid5", devices=3, size="32M")
    m = fs_mount(wh)
    m.mount()
    src = tmp_path / "src"
    src.mkdir()
    (src / "s.txt").write_bytes(b"source")
    before = time.time_ns()
    with open(m.path("f"), "wb") as f:
        f.write(b"x")
    os.mkdir(m.path("d"))
    os.symlink("f", m.path("l"))
    os.mkfifo(m.path("p"))
    dwfs("ghost", "import", str(src), m.path("d"))
    after = time.time_ns()
    paths = ["f", "d", "l", "p", "d/s.txt"]
    born = {p: birth_time(m.path(p), follow=False) for p in paths}
    for p, t in born.items():
        assert t is not None and before <= t <= after, (p, before, t, after)
    assert born["f"] < born["d"] < born["l"] < born["p"] < born["d/s.txt"]
    time.sleep(2 * TICK)
    with open(m.path("f"), "ab") as f:
        f.write(b"more")
    os.chmod(m.path("f"), 0o600)
    os.utime(m.path("f"), ns=(1, 2))
    os.link(m.path("f"), m.path("hard"))
    os.rename(m.path("f"), m.path("d/moved"))
    assert birth_time(m.path("d/moved")) == birth_time(m.path("hard")) == born["f"]
    assert os.stat(m.path("hard")).st_ctime_ns > born["f"]
    assert birth_time(m.path("d/s.txt")) == born["d/s.txt"]  # reading hydrates: no change
    with open(m.path("d/s.txt"), "rb") as f:
        assert f.read() == b"source"
    assert birth_time(m.path("d/s.txt")) == born["d/s.txt"]
    m.umount()
    m.mount()
    assert birth_time(m.path("d/moved")) == born["f"]
    assert birth_time(m.path("d"), follow=False) == born["d"]
    m.umount()

    meta = os.path.join(wh, "meta.db")
    db = sqlite3.connect(meta)
    with db:
        db.execute("ALTER TABLE inodes DROP COLUMN btime_ns")
    db.close()
    m.mount("ro")
    assert birth_time(m.path("d/moved")) is None
    assert b"Birth: -" in subprocess.run(["stat", m.path("hard")], capture_output=True,
                                         check=True).stdout
    m.umount()
    m.mount()
    assert birth_time(m.path("d/moved")) is None
    t = time.time_ns()
    with open(m.path("new"), "wb"):
        pass
    assert t <= birth_time(m.path("new")) <= time.time_ns()
    m.umount()
    assert dwfs("fsck", wh, check=False).returncode == 0
