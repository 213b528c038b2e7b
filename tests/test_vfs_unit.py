"""Unit tests of vfs.Filesystem without a kernel: a real Volume on block files, POSIX rules,
persistence across commit + reopen, copy-on-write, ENOSPC, holes, orphans."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time

import pytest
from volhelpers import build, close_members, open_vol, rand_bytes

import vfs.content
from vfs import fsck
from vfs.alloc import SECTOR
from vfs.attrs import NAME_MAX, ROOT_INODE, Caller, SetAttr
from vfs.content import KEEP_SIZE, PUNCH_HOLE
from vfs.errors import FSError
from vfs.filedata import BLOCK
from vfs.fs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RESERVED_SECTORS,
    XATTR_CREATE,
    XATTR_REPLACE,
    Filesystem,
)
from vfs.metadb import MetaDB

ROOT = Caller(0, 0)
USER = Caller(1000, 1000)
GiB = 1 << 30


class Env:
    """A filesystem on a small raidz2 volume that can be closed and reopened."""

    def __init__(self, directory, rows: int = 64) -> None:
        self.directory = str(directory)
        self.paths, self.uuid, _g = build(os.path.join(self.directory, "members"), "raidz2", 5,
                                          chunk=65536, rows=rows)
        self.meta = os.path.join(self.directory, "meta.db")
        db = MetaDB(self.meta, create=True)
        Filesystem.format(db, 0, 0)
        db.close()
        self.fs: Filesystem | None = None
        self.open()

    def open(self) -> Filesystem:
        self.vol = open_vol(self.paths, self.uuid)
        self.db = MetaDB(self.meta)
        self.fs = Filesystem(self.db, self.vol)
        return self.fs

    def close(self, clean: bool = True) -> None:
        """Close cleanly, or as a crash would: nothing uncommitted reaches the database."""
        if clean:
            self.fs.close()
            self.db.close()
            self.vol.close()
        else:
            self.db.conn.close()  # an open transaction is rolled back
            close_members(self.vol)
        self.fs = None

    def reopen(self) -> Filesystem:
        self.close()
        return self.open()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    if e.fs is not None:
        e.close()


@pytest.fixture
def fs(env) -> Filesystem:
    return env.fs


def errno_of(func, *args, **kw) -> int:
    """The errno `func(*args)` fails with (fails the test if it succeeds)."""
    with pytest.raises(FSError) as exc:
        func(*args, **kw)
    return exc.value.errno


def mkfile(fs: Filesystem, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644,
           caller: Caller = ROOT) -> int:
    a = fs.create(parent, name, mode, os.O_RDWR, caller)
    if data:
        assert fs.write(a.ino, 0, data) == len(data)
    fs.release(a.ino)
    return a.ino


def names(fs: Filesystem, ino: int) -> list[bytes]:
    out, cookie = [], 0
    while True:
        batch = fs.readdir(ino, cookie, limit=7)
        if not batch:
            return sorted(out)
        out += [e.name for e in batch]
        cookie = batch[-1].next_cookie


def read_all(fs: Filesystem, ino: int) -> bytes:
    return fs.read(ino, 0, fs.getattr(ino).size + 10)


def free_sectors(fs: Filesystem) -> int:
    return fs.statfs()["bfree"]


# --- names and types -----------------------------------------------------------------------------


def test_root_and_dot_entries(fs):
    a = fs.getattr(ROOT_INODE)
    assert stat.S_ISDIR(a.mode) and a.nlink == 2
    assert fs.lookup(ROOT_INODE, b"..").ino == ROOT_INODE
    assert fs.lookup(ROOT_INODE, b".").ino == ROOT_INODE
    assert names(fs, ROOT_INODE) == [b".", b".."]


def test_file_types_and_link_counts(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT)
    assert d.nlink == 2 and fs.getattr(ROOT_INODE).nlink == 3
    f = mkfile(fs, d.ino, b"f", b"hello")
    fifo = fs.mknod(d.ino, b"fifo", stat.S_IFIFO | 0o600, 0, ROOT)
    assert stat.S_ISFIFO(fifo.mode) and fifo.rdev == 0
    chr_ = fs.mknod(d.ino, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), ROOT)
    assert stat.S_ISCHR(chr_.mode) and chr_.rdev == os.makedev(1, 3)
    blk = fs.mknod(d.ino, b"blk", stat.S_IFBLK | 0o600, os.makedev(7, 0), ROOT)
    assert stat.S_ISBLK(blk.mode) and blk.rdev == os.makedev(7, 0)
    sock = fs.mknod(d.ino, b"sock", stat.S_IFSOCK | 0o600, 0, ROOT)
    assert stat.S_ISSOCK(sock.mode)
    reg = fs.mknod(d.ino, b"reg", 0o600, 0, ROOT)
    assert stat.S_ISREG(reg.mode)
    s = fs.symlink(d.ino, b"sl", b"../target", ROOT)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../target")
    assert fs.readlink(s.ino) == b"../target"
    assert errno_of(fs.readlink, f) == errno.EINVAL
    sub = fs.mkdir(d.ino, b"sub", 0o700, ROOT)
    assert fs.getattr(d.ino).nlink == 3
    assert fs.lookup(sub.ino, b"..").ino == d.ino
    assert names(fs, d.ino) == sorted([b".", b"..", b"f", b"fifo", b"null", b"blk", b"sock",
                                       b"reg", b"sl", b"sub"])
    assert errno_of(fs.mkdir, d.ino, b"f", 0o755, ROOT) == errno.EEXIST
    assert errno_of(fs.mknod, d.ino, b"sl", stat.S_IFIFO | 0o600, 0, ROOT) == errno.EEXIST
    assert errno_of(fs.symlink, d.ino, b"sub", b"x", ROOT) == errno.EEXIST
    assert errno_of(fs.lookup, d.ino, b"missing") == errno.ENOENT
    assert errno_of(fs.lookup, f, b"x") == errno.ENOTDIR
    assert errno_of(fs.mkdir, f, b"x", 0o755, ROOT) == errno.ENOTDIR


def test_readdir_cookies_resume(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    want = [b"f%03d" % i for i in range(40)]
    for n in want:
        mkfile(fs, d, n)
    for n in want[::3]:
        fs.unlink(d, n)
    got = names(fs, d)
    assert got == sorted([b".", b".."] + [n for i, n in enumerate(want) if i % 3])


def test_name_max(fs):
    ok = b"n" * NAME_MAX
    long = b"n" * (NAME_MAX + 1)
    a = mkfile(fs, ROOT_INODE, ok, b"x")
    assert fs.lookup(ROOT_INODE, ok).ino == a
    assert errno_of(fs.lookup, ROOT_INODE, long) == errno.ENAMETOOLONG
    assert errno_of(fs.create, ROOT_INODE, long, 0o644, os.O_RDWR, ROOT) == errno.ENAMETOOLONG
    assert errno_of(fs.mkdir, ROOT_INODE, long, 0o755, ROOT) == errno.ENAMETOOLONG
    assert errno_of(fs.mknod, ROOT_INODE, long, stat.S_IFIFO, 0, ROOT) == errno.ENAMETOOLONG
    assert errno_of(fs.symlink, ROOT_INODE, long, b"t", ROOT) == errno.ENAMETOOLONG
    assert errno_of(fs.link, a, ROOT_INODE, long) == errno.ENAMETOOLONG
    assert errno_of(fs.rename, ROOT_INODE, ok, ROOT_INODE, long) == errno.ENAMETOOLONG
    assert errno_of(fs.unlink, ROOT_INODE, long) == errno.ENAMETOOLONG
    assert errno_of(fs.rmdir, ROOT_INODE, long) == errno.ENAMETOOLONG
    fs.rename(ROOT_INODE, ok, ROOT_INODE, b"m" * NAME_MAX)
    assert names(fs, ROOT_INODE) == [b".", b"..", b"m" * NAME_MAX]
    # multi-byte UTF-8: the limit is in bytes
    utf = "é".encode() * 127 + b"x"  # 255 bytes
    mkfile(fs, ROOT_INODE, utf)
    assert errno_of(fs.mkdir, ROOT_INODE, "é".encode() * 128, 0o755, ROOT) == errno.ENAMETOOLONG


def test_symlink_target_limits(fs):
    assert errno_of(fs.symlink, ROOT_INODE, b"s", b"", ROOT) == errno.ENOENT
    long_target = b"a/" * 2047 + b"b"  # 4095 bytes: fits PATH_MAX with its NUL
    s = fs.symlink(ROOT_INODE, b"s", long_target, ROOT)
    assert fs.readlink(s.ino) == long_target
    assert errno_of(fs.symlink, ROOT_INODE, b"t", b"x" * 4096, ROOT) == errno.ENAMETOOLONG


# --- hard links, unlink, rmdir -------------------------------------------------------------------


def test_hard_links(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    f = mkfile(fs, ROOT_INODE, b"f", b"data")
    before = fs.getattr(f).ctime_ns
    a = fs.link(f, d, b"g")
    assert a.ino == f and a.nlink == 2 and fs.getattr(f).ctime_ns >= before
    assert fs.lookup(d, b"g").ino == f
    assert errno_of(fs.link, f, d, b"g") == errno.EEXIST
    assert errno_of(fs.link, d, ROOT_INODE, b"dl") == errno.EPERM
    fs.unlink(ROOT_INODE, b"f")
    assert fs.getattr(f).nlink == 1
    assert read_all(fs, f) == b"data"
    fs.unlink(d, b"g")
    assert errno_of(fs.getattr, f) == errno.ENOENT


def test_unlink_and_rmdir_errors(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    mkfile(fs, d, b"f")
    assert errno_of(fs.unlink, ROOT_INODE, b"d") == errno.EISDIR
    assert errno_of(fs.rmdir, d, b"f") == errno.ENOTDIR
    assert errno_of(fs.rmdir, ROOT_INODE, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.unlink, ROOT_INODE, b"nope") == errno.ENOENT
    assert errno_of(fs.rmdir, ROOT_INODE, b"nope") == errno.ENOENT
    assert errno_of(fs.rmdir, d, b".") == errno.EINVAL
    assert errno_of(fs.rmdir, d, b"..") == errno.ENOTEMPTY
    fs.unlink(d, b"f")
    fs.rmdir(ROOT_INODE, b"d")
    assert fs.getattr(ROOT_INODE).nlink == 2
    assert errno_of(fs.getattr, d) == errno.ENOENT


def test_unlink_keeps_the_name_of_a_directory_and_takes_attributes_with_the_inode(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    before = fs.getattr(ROOT_INODE)
    assert errno_of(fs.unlink, ROOT_INODE, b"d") == errno.EISDIR
    assert fs.lookup(ROOT_INODE, b"d").ino == d  # the refused unlink changed nothing
    assert fs.getattr(ROOT_INODE) == before
    assert errno_of(fs.unlink, d, b"x" * (NAME_MAX + 1)) == errno.ENAMETOOLONG
    f = mkfile(fs, d, b"f")
    assert errno_of(fs.unlink, f, b"f") == errno.ENOTDIR  # a file as the parent
    fs.setxattr(f, b"user.a", b"1")
    fs.link(f, ROOT_INODE, b"g")
    fs.unlink(d, b"f")  # one name left: the attribute stays
    assert fs.getxattr(f, b"user.a") == b"1"
    fs.unlink(ROOT_INODE, b"g")  # the last name: inode, attributes and all go
    assert errno_of(fs.getattr, f) == errno.ENOENT
    assert fs.db.value("SELECT count(*) FROM xattrs WHERE inode=?", (f,)) == 0


def test_unlink_open_file_keeps_data_until_last_close(env, fs):
    free0 = free_sectors(fs)
    data = os.urandom(3 * BLOCK + 123)
    a = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
    fs.write(a.ino, 0, data)
    fs.open(a.ino, os.O_RDONLY)  # a second open
    fs.commit()
    fs.unlink(ROOT_INODE, b"f")
    assert errno_of(fs.lookup, ROOT_INODE, b"f") == errno.ENOENT
    assert fs.getattr(a.ino).nlink == 0
    assert fs.read(a.ino, 0, len(data)) == data
    fs.write(a.ino, len(data), b"more")  # still writable through the open file
    fs.setattr(a.ino, SetAttr(size=len(data) + 2))
    fs.release(a.ino)
    assert fs.read(a.ino, 0, len(data) + 10) == data + b"mo"
    fs.release(a.ino)
    assert errno_of(fs.getattr, a.ino) == errno.ENOENT
    fs.commit()
    assert free_sectors(fs) == free0


def test_tmpfile_is_nameless_until_linked(env, fs):
    """O_TMPFILE: no name, no links and the directory untouched; `link` names it while it is
    open; unnamed, it is freed at its last close, or at the next open after a crash."""
    d = fs.mkdir(ROOT_INODE, b"d", 0o2775, ROOT).ino
    fs.setattr(d, SetAttr(gid=77))
    before = fs.getattr(d)
    free0 = free_sectors(fs)
    a = fs.tmpfile(d, 0o600, os.O_RDWR, USER)
    assert (a.nlink, a.uid, a.gid, stat.S_IMODE(a.mode)) == (0, 1000, 77, 0o600)
    assert names(fs, d) == [b".", b".."] and fs.getattr(d).mtime_ns == before.mtime_ns
    fs.write(a.ino, 0, b"kept")
    assert fs.link(a.ino, d, b"kept").nlink == 1
    fs.release(a.ino)
    assert read_all(fs, fs.lookup(d, b"kept").ino) == b"kept"
    b = fs.tmpfile(d, 0o600, os.O_RDWR, ROOT)
    fs.write(b.ino, 0, os.urandom(3 * BLOCK))
    fs.release(b.ino)
    assert errno_of(fs.getattr, b.ino) == errno.ENOENT
    assert errno_of(fs.link, b.ino, d, b"late") == errno.ENOENT
    c = fs.tmpfile(d, 0o600, os.O_RDWR, ROOT)
    fs.write(c.ino, 0, os.urandom(3 * BLOCK))
    fs.commit()
    env.close()  # "crash" with the temporary file open
    fs = env.open()
    assert errno_of(fs.getattr, c.ino) == errno.ENOENT
    fs.commit()
    kept = fs.lookup(d, b"kept")
    assert free_sectors(fs) == free0 - kept.blocks * 512 // SECTOR
    assert errno_of(fs.tmpfile, kept.ino, 0o600, os.O_RDWR, ROOT) == errno.ENOTDIR


def test_removed_directory_lives_while_open(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    fs.opendir(d)
    fs.rmdir(ROOT_INODE, b"d")
    a = fs.getattr(d)
    assert stat.S_ISDIR(a.mode) and a.nlink == 0
    assert fs.readdir(d, 0) == []
    assert errno_of(fs.mkdir, d, b"x", 0o755, ROOT) == errno.ENOENT
    assert errno_of(fs.create, d, b"x", 0o644, os.O_RDWR, ROOT) == errno.ENOENT
    fs.releasedir(d)
    assert errno_of(fs.getattr, d) == errno.ENOENT
    # replaced by a rename: the same
    e = fs.mkdir(ROOT_INODE, b"e", 0o755, ROOT).ino
    t = fs.mkdir(ROOT_INODE, b"t", 0o755, ROOT).ino
    fs.opendir(t)
    fs.rename(ROOT_INODE, b"e", ROOT_INODE, b"t")
    assert fs.getattr(t).nlink == 0 and fs.lookup(ROOT_INODE, b"t").ino == e
    assert fs.getattr(ROOT_INODE).nlink == 3
    fs.releasedir(t)
    assert errno_of(fs.getattr, t) == errno.ENOENT


def test_a_replaced_file_lives_while_the_kernel_holds_it(env, fs):
    """A rename over a file the kernel has an entry for (a reader looked it up a moment
    before) keeps the old inode until the kernel forgets it: the reader's open finds it."""
    free0 = free_sectors(fs)
    old = fs.create(ROOT_INODE, b"target", 0o644, os.O_RDWR, ROOT)
    fs.remember(old.ino)  # the entry create's reply gave
    fs.write(old.ino, 0, b"old" * BLOCK)
    fs.release(old.ino)
    fs.remember(old.ino)  # a reader's lookup
    new = fs.create(ROOT_INODE, b"tmp", 0o644, os.O_RDWR, ROOT)
    fs.write(new.ino, 0, b"new")
    fs.release(new.ino)
    fs.rename(ROOT_INODE, b"tmp", ROOT_INODE, b"target")
    assert fs.lookup(ROOT_INODE, b"target").ino == new.ino
    assert fs.getattr(old.ino).nlink == 0
    fs.open(old.ino, os.O_RDONLY)  # the reader's open of what it looked up
    assert fs.read(old.ino, 0, 3) == b"old"
    fs.release(old.ino)
    fs.forget([(old.ino, 1)])
    assert fs.getattr(old.ino).nlink == 0  # one reference left
    fs.forget([(old.ino, 1)])
    assert errno_of(fs.getattr, old.ino) == errno.ENOENT
    fs.unlink(ROOT_INODE, b"target")
    fs.commit()
    assert free_sectors(fs) == free0
    # Empty files the kernel lets go of are freed together: at the next commit at the latest.
    empties = [fs.create(ROOT_INODE, b"e%d" % i, 0o644, os.O_RDWR, ROOT).ino for i in range(3)]
    for ino in empties:
        fs.remember(ino)
        fs.release(ino)
        fs.unlink(ROOT_INODE, b"e%d" % (empties.index(ino)))
    fs.forget([(ino, 1) for ino in empties])
    assert fs.needs_commit()
    fs.commit()
    for ino in empties:
        assert errno_of(fs.getattr, ino) == errno.ENOENT
    assert fs.db.value("SELECT count(*) FROM inodes WHERE nlink=0") == 0


def test_a_removed_file_only_the_kernel_holds_counts_as_free_space(fs):
    """The kernel sends its FORGET of a removed file a moment after the unlink has answered:
    statfs counts such a file's space (stored or still dirty) free at once, as `df` right
    after `rm` expects; an open one's stays in use until its last close."""
    fs.commit()
    free0 = free_sectors(fs)
    stored = fs.create(ROOT_INODE, b"stored", 0o644, os.O_RDWR, ROOT)
    fs.remember(stored.ino)
    fs.write(stored.ino, 0, os.urandom(4 * BLOCK))
    fs.release(stored.ino)
    fs.commit()
    dirty = fs.create(ROOT_INODE, b"dirty", 0o644, os.O_RDWR, ROOT)
    fs.remember(dirty.ino)
    fs.write(dirty.ino, 0, os.urandom(2 * BLOCK))
    fs.release(dirty.ino)
    is_open = fs.create(ROOT_INODE, b"open", 0o644, os.O_RDWR, ROOT)
    fs.remember(is_open.ino)
    fs.write(is_open.ino, 0, os.urandom(BLOCK))
    used = 7 * BLOCK // SECTOR
    assert free_sectors(fs) <= free0 - used
    for name in (b"stored", b"dirty", b"open"):
        fs.unlink(ROOT_INODE, name)
    assert fs.getattr(stored.ino).nlink == 0  # still there for the kernel's requests
    assert free_sectors(fs) == free0 - BLOCK // SECTOR  # all but the open file's
    fs.release(is_open.ino)
    assert free_sectors(fs) == free0
    assert fs.read(stored.ino, 0, 1)  # a request the kernel may still send finds the data
    fs.forget([(stored.ino, 1), (dirty.ino, 1), (is_open.ino, 1)])
    fs.commit()
    assert free_sectors(fs) == free0
    for ino in (stored.ino, dirty.ino, is_open.ino):
        assert errno_of(fs.getattr, ino) == errno.ENOENT


def test_a_write_short_of_space_waits_for_the_forget_of_a_removed_file(env, monkeypatch):
    """On a full volume, a write right after an `rm` needs the removed file's space, which
    comes back when the kernel's FORGET arrives: the write waits for it (FORGET_WAIT at
    most), instead of ENOSPC. Without a FORGET it fails with ENOSPC, changing nothing."""
    fs = env.fs
    big = fs.create(ROOT_INODE, b"big", 0o644, os.O_RDWR, ROOT).ino
    fs.remember(big)
    written = _fill(fs, big, 4 * BLOCK)
    fs.release(big)
    fs.commit()
    fs.unlink(ROOT_INODE, b"big")
    new = mkfile(fs, ROOT_INODE, b"new")
    monkeypatch.setattr(vfs.content, "FORGET_WAIT", 0.05)
    assert errno_of(fs.write, new, 0, b"n" * written) == errno.ENOSPC
    assert fs.getattr(new).size == 0 and fs.getattr(big).nlink == 0
    monkeypatch.setattr(vfs.content, "FORGET_WAIT", 30.0)
    counted = threading.Event()

    def kernel_forgets() -> None:  # as the FUSE session does: counted without the lock
        time.sleep(0.2)
        released = fs.drop_refs([(big, 1)])
        counted.set()
        fs.free_forgotten(released)

    forgetter = threading.Thread(target=kernel_forgets)
    forgetter.start()
    try:
        assert fs.write(new, 0, b"n" * written) == written
    finally:
        forgetter.join()
    assert counted.is_set()
    assert errno_of(fs.getattr, big) == errno.ENOENT
    assert fs.read(new, written - 3, 10) == b"nnn"


def test_setid_bits_cleared_where_the_kernel_asks(fs):
    """kill_setid (a writer, truncater or opener with O_TRUNC without CAP_FSETID, or any
    chown) clears set-user-ID, and set-group-ID only with group execute; without it, or for
    an empty write, the mode stays."""
    def setid_file(name: bytes, mode: int) -> int:
        ino = mkfile(fs, ROOT_INODE, name, b"x" * 100)
        fs.setattr(ino, SetAttr(mode=mode))
        return ino

    def mode_of(ino: int) -> int:
        return stat.S_IMODE(fs.getattr(ino).mode)

    a, b, c, e = (setid_file(n, m) for n, m in ((b"a", 0o6775), (b"b", 0o6745),
                                                (b"c", 0o6775), (b"e", 0o6775)))
    fs.open(a, os.O_RDWR)
    fs.write(a, 0, b"y")
    assert mode_of(a) == 0o6775  # no kill asked: a writer with CAP_FSETID
    fs.write(a, 0, b"", kill_setid=True)
    assert mode_of(a) == 0o6775  # nothing written
    ctime = fs.getattr(a).ctime_ns
    fs.write(a, 0, b"y", kill_setid=True)
    assert mode_of(a) == 0o775 and fs.getattr(a).ctime_ns >= ctime
    fs.release(a)
    fs.setattr(b, SetAttr(size=10, kill_setid=True))
    assert mode_of(b) == 0o2745 and fs.getattr(b).size == 10
    fs.setattr(c, SetAttr(uid=1, gid=1, kill_setid=True))
    assert mode_of(c) == 0o775 and fs.getattr(c).uid == 1
    fs.open(e, os.O_WRONLY | os.O_TRUNC, kill_setid=True)
    fs.release(e)
    assert mode_of(e) == 0o775 and fs.getattr(e).size == 0
    d = fs.mkdir(ROOT_INODE, b"d", 0o2775, ROOT).ino
    fs.setattr(d, SetAttr(uid=1, kill_setid=True))
    assert mode_of(d) == 0o2775  # a directory's set-group-ID is inheritance: chown keeps it


def test_orphans_freed_at_reopen(env):
    fs = env.fs
    free0 = free_sectors(fs)
    a = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
    fs.write(a.ino, 0, os.urandom(5 * BLOCK))
    fs.unlink(ROOT_INODE, b"f")
    fs.commit()  # the open, unlinked inode is committed
    assert free_sectors(fs) < free0
    env.close()  # "crash" with the file still open
    fs = env.open()
    assert errno_of(fs.getattr, a.ino) == errno.ENOENT
    assert fs.db.value("SELECT count(*) FROM extents") == 0
    assert free_sectors(fs) == free0
    env.reopen()
    assert free_sectors(env.fs) == free0


def test_fsck_reports_a_crash_orphan_without_calling_it_a_fault(env):
    """After a crash with a file unlinked while open, fsck lists the orphan and stays clean
    (the next read-write open frees it, as test_orphans_freed_at_reopen shows); a repair
    frees it too."""
    fs = env.fs
    a = fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
    fs.write(a.ino, 0, os.urandom(5 * BLOCK))
    fs.unlink(ROOT_INODE, b"f")
    fs.commit()
    env.close()  # "crash" with the file still open
    for repair in (False, True):
        db, vol = MetaDB(env.meta), open_vol(env.paths, env.uuid)
        try:
            report = fsck.check(db, vol, repair=repair)
            assert report.clean and report.orphans == [a.ino], report
            assert db.value("SELECT count(*) FROM inodes WHERE id=?", (a.ino,)) == (not repair)
            assert (db.value("SELECT count(*) FROM extents WHERE inode=?", (a.ino,)) == 0) \
                == repair  # its data is kept until it is freed
        finally:
            db.close()
            vol.close()
    fs = env.open()
    assert errno_of(fs.getattr, a.ino) == errno.ENOENT
    assert fsck.check(env.db, env.vol).orphans == []


# --- persistence ---------------------------------------------------------------------------------


def test_everything_persists_across_reopen(env):
    fs = env.fs
    d = fs.mkdir(ROOT_INODE, b"dir", 0o2775, USER).ino
    data = os.urandom(2 * BLOCK + 777)
    f = mkfile(fs, d, b"file", data, caller=USER)
    fs.link(f, ROOT_INODE, b"hard")
    fs.symlink(d, b"link", b"file", USER)
    fs.mknod(d, b"dev", stat.S_IFCHR | 0o600, os.makedev(4, 5), ROOT)
    fs.setxattr(f, b"user.k", b"v\0bin")
    fs.setattr(f, SetAttr(atime_ns=1_000_000_001, mtime_ns=2_000_000_002))
    sparse = mkfile(fs, ROOT_INODE, b"sparse")
    fs.write(sparse, 5 * GiB, b"tail")
    fs = env.reopen()
    assert fs.lookup(ROOT_INODE, b"dir").ino == d
    a = fs.lookup(d, b"file")
    assert (a.ino, a.size, a.nlink, a.uid, a.gid) == (f, len(data), 2, 1000, 1000)
    assert (a.atime_ns, a.mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert read_all(fs, f) == data
    assert fs.readlink(fs.lookup(d, b"link").ino) == b"file"
    assert fs.lookup(d, b"dev").rdev == os.makedev(4, 5)
    assert fs.getxattr(f, b"user.k") == b"v\0bin"
    assert fs.getattr(d).mode == stat.S_IFDIR | 0o2775
    s = fs.getattr(sparse)
    assert s.size == 5 * GiB + 4
    assert fs.read(sparse, 5 * GiB - 2, 10) == b"\0\0tail"


def test_uncommitted_changes_are_lost_not_garbled(env):
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f", b"old" * 1000)
    fs.commit()
    fs.write(f, 0, b"new" * 30000)
    mkfile(fs, ROOT_INODE, b"g", b"x")
    env.close(clean=False)  # no commit
    fs = env.open()
    assert read_all(fs, f) == b"old" * 1000
    assert errno_of(fs.lookup, ROOT_INODE, b"g") == errno.ENOENT


# --- contents ------------------------------------------------------------------------------------


def test_read_write_at_any_offset(fs):
    f = mkfile(fs, ROOT_INODE, b"f")
    model = bytearray()
    import random

    rng = random.Random(5)
    for _ in range(60):
        off = rng.choice([0, rng.randrange(4 * BLOCK), BLOCK - 1, BLOCK, 2 * BLOCK + 3,
                          len(model), len(model) + rng.randrange(BLOCK)])
        n = rng.choice([1, 7, 100, BLOCK, BLOCK + 1, 3 * BLOCK - 5])
        data = rng.randbytes(n)
        fs.write(f, off, data)
        if off > len(model):
            model += bytes(off - len(model))
        model[off : off + n] = data
        if rng.random() < 0.2:
            fs.commit()
        if rng.random() < 0.15:
            size = rng.randrange(len(model) + BLOCK)
            fs.setattr(f, SetAttr(size=size))
            model = model[:size] + bytes(max(0, size - len(model)))
        r_off = rng.randrange(len(model) + 10)
        r_n = rng.randrange(1, 3 * BLOCK)
        assert fs.read(f, r_off, r_n) == bytes(model[r_off : r_off + r_n])
    assert fs.getattr(f).size == len(model)
    assert read_all(fs, f) == bytes(model)
    fs.commit()
    assert read_all(fs, f) == bytes(model)


def test_read_and_write_errors(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    f = mkfile(fs, ROOT_INODE, b"f", b"abc")
    assert errno_of(fs.read, d, 0, 10) == errno.EISDIR
    assert errno_of(fs.write, d, 0, b"x") == errno.EISDIR
    assert errno_of(fs.write, f, -1, b"x") == errno.EINVAL
    assert errno_of(fs.write, f, 1 << 44, b"x") == errno.EFBIG
    top = (1 << 44) - 4096  # ext4's largest file with 4 KiB blocks
    assert errno_of(fs.write, f, top, b"x") == errno.EFBIG
    assert fs.write(f, top - 3, b"abcdef") == 3  # what fits is written, as write(2) does
    assert fs.getattr(f).size == top and fs.read(f, top - 3, 10) == b"abc"
    fs.setattr(f, SetAttr(size=3))
    assert fs.read(f, 100, 10) == b""
    assert fs.write(f, 1, b"") == 0 and read_all(fs, f) == b"abc"


def test_holes_and_st_blocks(fs):
    f = mkfile(fs, ROOT_INODE, b"f")
    fs.setattr(f, SetAttr(size=10 * BLOCK))
    fs.commit()
    a = fs.getattr(f)
    assert a.size == 10 * BLOCK and a.blocks == 0
    assert fs.read(f, 0, 10 * BLOCK) == bytes(10 * BLOCK)
    fs.write(f, 4 * BLOCK, b"x" * BLOCK)
    fs.commit()
    assert fs.getattr(f).blocks == BLOCK // 512
    fs.write(f, 4 * BLOCK, bytes(BLOCK))  # zeros punch the block back into a hole
    fs.commit()
    assert fs.getattr(f).blocks == 0
    # a short tail block takes only the sectors it needs
    g = mkfile(fs, ROOT_INODE, b"g", b"y" * 100)
    fs.commit()
    assert fs.getattr(g).blocks == SECTOR // 512


def test_large_sparse_offsets(fs):
    f = mkfile(fs, ROOT_INODE, b"big")
    offs = [4 * GiB - 1, 4 * GiB, 4 * GiB + BLOCK - 3, 17 * GiB + 5]
    for i, off in enumerate(offs):
        fs.write(f, off, bytes([65 + i]) * 5)
    fs.commit()
    a = fs.getattr(f)
    assert a.size == 17 * GiB + 10
    assert a.blocks <= 4 * BLOCK // 512
    for i, off in enumerate(offs[1:], 1):
        assert fs.read(f, off - 1, 7)[1:6] == bytes([65 + i]) * 5
    assert fs.read(f, 4 * GiB - 2, 8) == b"\0" + b"A" + b"BBBBB" + b"\0"
    fs.setattr(f, SetAttr(size=4 * GiB + 2))
    assert fs.read(f, 4 * GiB - 2, 100) == b"\0ABB"
    fs.setattr(f, SetAttr(size=6 * GiB))
    assert fs.read(f, 4 * GiB - 2, 8) == b"\0ABB\0\0\0\0"
    assert fs.read(f, 6 * GiB - 4, 100) == bytes(4)


def test_truncate_both_ways_zero_fills(fs):
    f = mkfile(fs, ROOT_INODE, b"f", b"z" * (2 * BLOCK + 100))
    fs.commit()
    fs.setattr(f, SetAttr(size=BLOCK + 10))
    fs.setattr(f, SetAttr(size=3 * BLOCK))
    assert read_all(fs, f) == b"z" * (BLOCK + 10) + bytes(2 * BLOCK - 10)
    fs.commit()
    fs.setattr(f, SetAttr(size=5))
    fs.commit()
    fs.setattr(f, SetAttr(size=BLOCK))
    assert read_all(fs, f) == b"zzzzz" + bytes(BLOCK - 5)
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    assert errno_of(fs.setattr, d, SetAttr(size=0)) == errno.EISDIR
    assert errno_of(fs.setattr, f, SetAttr(size=-1)) == errno.EINVAL
    assert errno_of(fs.setattr, f, SetAttr(size=(1 << 44) + 1)) == errno.EFBIG
    p = fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o644, 0, ROOT).ino
    assert errno_of(fs.setattr, p, SetAttr(size=0)) == errno.EINVAL


def test_open_trunc(fs):
    f = mkfile(fs, ROOT_INODE, b"f", b"abcdef")
    fs.open(f, os.O_WRONLY | os.O_TRUNC)
    assert fs.getattr(f).size == 0
    fs.release(f)
    fs.write(f, 0, b"abc")
    fs.open(f, os.O_RDONLY | os.O_TRUNC)  # unspecified by POSIX; Linux truncates
    assert fs.getattr(f).size == 0
    fs.release(f)
    fs.write(f, 0, b"abc")
    fs.open(f, os.O_RDONLY)
    assert read_all(fs, f) == b"abc"
    fs.release(f)


def test_copy_on_write_frees_old_sectors_only_after_commit(fs):
    f = mkfile(fs, ROOT_INODE, b"f", b"A" * BLOCK)
    fs.commit()
    addr, nsect = fs.db.row("SELECT addr, nsect FROM extents WHERE inode=?", (f,))
    old = fs.volume.read(addr * SECTOR, nsect * SECTOR)
    free0 = fs.alloc.free_count
    fs.write(f, 0, b"B" * BLOCK)
    addr2 = fs.db.value("SELECT addr FROM extents WHERE inode=?", (f,))
    assert addr2 != addr
    # the old sectors are neither free nor overwritten before the commit
    assert not any(s <= addr < s + n for s, n in fs.alloc.extents())
    assert fs.alloc.free_count == free0 - nsect
    mkfile(fs, ROOT_INODE, b"g", os.urandom(4 * BLOCK))
    assert fs.volume.read(addr * SECTOR, nsect * SECTOR) == old
    fs.commit()
    assert any(s <= addr < s + n for s, n in fs.alloc.extents())
    assert read_all(fs, f) == b"B" * BLOCK


def test_failed_operation_changes_nothing(fs):
    f = mkfile(fs, ROOT_INODE, b"f", b"abc")
    before = fs.db.value("SELECT count(*) FROM dentries")
    assert errno_of(fs.rename, ROOT_INODE, b"f", ROOT_INODE, b"x" * 300) == errno.ENAMETOOLONG
    assert fs.db.value("SELECT count(*) FROM dentries") == before
    assert fs.lookup(ROOT_INODE, b"f").ino == f


# --- ENOSPC --------------------------------------------------------------------------------------


def _fill(fs: Filesystem, ino: int, chunk: int, start: int = 0) -> int:
    """Write `chunk`-byte pieces until ENOSPC; returns the bytes written."""
    off = start
    piece = b"\xa5" * chunk
    while True:
        try:
            fs.write(ino, off, piece)
        except FSError as exc:
            assert exc.errno == errno.ENOSPC
            return off - start
        off += chunk


@pytest.mark.parametrize("chunk", [BLOCK, 4 * BLOCK, 1000])
def test_enospc_keeps_data_and_space_comes_back(env, chunk):
    fs = env.fs
    keep = os.urandom(3 * BLOCK + 5)
    k = mkfile(fs, ROOT_INODE, b"keep", keep)
    fs.commit()
    free0 = free_sectors(fs) + fs.copy_reserve  # the room kept for the metadata copy follows
    big = mkfile(fs, ROOT_INODE, b"big")      # the database's size, which deletes do not shrink
    written = _fill(fs, big, chunk)
    assert written > free0 * SECTOR // 2
    size = fs.getattr(big).size
    assert size == written
    # a failed write changed nothing: the file reads back what was written
    fs.commit()
    assert fs.read(big, 0, 10) == b"\xa5" * 10
    assert fs.read(big, size - 10, 100) == b"\xa5" * 10
    # other data is intact, and so is new metadata
    assert read_all(fs, k) == keep
    g = mkfile(fs, ROOT_INODE, b"empty-ok")
    assert fs.getattr(g).size == 0
    # ENOSPC came when the volume was full (a write is refused whole, not cut short)
    assert fs.statfs()["bfree"] * SECTOR < chunk + 2 * BLOCK
    assert _fill(fs, g, BLOCK) < chunk + 2 * BLOCK
    # delete: the space comes back (without an explicit commit first)
    fs.unlink(ROOT_INODE, b"big")
    again = mkfile(fs, ROOT_INODE, b"again")
    assert _fill(fs, again, chunk) >= written - 4 * BLOCK
    fs.unlink(ROOT_INODE, b"again")
    fs.unlink(ROOT_INODE, b"empty-ok")
    fs.commit()
    assert free_sectors(fs) + fs.copy_reserve == free0
    fs = env.reopen()
    assert read_all(fs, k) == keep
    assert free_sectors(fs) + fs.copy_reserve == free0


def test_punching_whole_sectors_works_on_a_full_volume(env):
    """A hole punched at sector edges needs no room, so a full volume can be made roomy
    again without deleting anything; a punch that must rewrite part of a sector says ENOSPC
    and changes nothing."""
    fs = env.fs
    big = mkfile(fs, ROOT_INODE, b"big")
    written = _fill(fs, big, BLOCK)
    fs.commit()
    assert _fill(fs, mkfile(fs, ROOT_INODE, b"more"), BLOCK) == 0
    before = read_all(fs, big)
    assert errno_of(fs.fallocate, big, PUNCH_HOLE | KEEP_SIZE, 100, 8 * BLOCK) == errno.ENOSPC
    assert read_all(fs, big) == before
    fs.fallocate(big, PUNCH_HOLE | KEEP_SIZE, 0, 8 * BLOCK)
    fs.commit()
    assert fs.read(big, 0, 8 * BLOCK) == bytes(8 * BLOCK)
    assert fs.getattr(big).size == written
    g = mkfile(fs, ROOT_INODE, b"fits", os.urandom(6 * BLOCK))
    assert fs.getattr(g).size == 6 * BLOCK


def test_truncation_works_on_a_full_volume(env):
    """truncate(2) knows no ENOSPC. On a full volume a file shrinks even where its new last
    sector holds data and is rewritten (from room writes leave for it), again and again; a
    sparse file's hole tail stays a hole; the volume stays as full as before."""
    fs = env.fs
    big = mkfile(fs, ROOT_INODE, b"big")
    written = _fill(fs, big, BLOCK)
    fs.commit()
    assert _fill(fs, mkfile(fs, ROOT_INODE, b"more"), BLOCK) == 0
    size = written
    for cut in (100, 4096 + 7, 3 * BLOCK + 1, 5, 2 * SECTOR - 1):
        size -= cut
        fs.setattr(big, SetAttr(size=size))  # ftruncate
        assert fs.getattr(big).size == size
    fs.commit()
    assert read_all(fs, big) == b"\xa5" * size
    sparse = mkfile(fs, ROOT_INODE, b"sparse")
    fs.setattr(sparse, SetAttr(size=10 * GiB))
    fs.setattr(sparse, SetAttr(size=5 * GiB + 1))
    assert fs.getattr(sparse).blocks == 0
    assert fs.read(sparse, 5 * GiB - 10, 100) == bytes(11)
    # writes meet ENOSPC once the ~3.2 blocks the cuts freed are used: nothing was lost
    assert _fill(fs, mkfile(fs, ROOT_INODE, b"w"), BLOCK) <= 4 * BLOCK
    fs = env.reopen()
    assert read_all(fs, big) == b"\xa5" * size


def test_enospc_failed_write_keeps_old_bytes(env):
    """A write that fails with ENOSPC leaves the file as it was, even in a partial block."""
    fs = env.fs
    f = mkfile(fs, ROOT_INODE, b"f", b"o" * 100)
    fs.commit()
    big = mkfile(fs, ROOT_INODE, b"big")
    _fill(fs, big, BLOCK)
    with pytest.raises(FSError) as exc:
        fs.write(f, 50, b"N" * (8 * BLOCK))
    assert exc.value.errno == errno.ENOSPC
    assert fs.getattr(f).size == 100
    assert read_all(fs, f) == b"o" * 100
    fs.setattr(f, SetAttr(size=BLOCK))  # nothing of the failed write beyond the end either
    assert read_all(fs, f) == b"o" * 100 + bytes(BLOCK - 100)
    fs.unlink(ROOT_INODE, b"big")
    fs.commit()
    assert read_all(fs, f) == b"o" * 100 + bytes(BLOCK - 100)


def test_enospc_small_writes_then_commit(env):
    """Small writes that stay buffered must not be accepted beyond what commit can store."""
    fs = env.fs
    files = []
    i = 0
    try:
        while True:
            ino = mkfile(fs, ROOT_INODE, b"s%d" % i)
            files.append(ino)
            fs.write(ino, 0, b"s" * 3000)
            fs.write(ino, BLOCK, b"t" * 3000)
            i += 1
    except FSError as exc:
        assert exc.errno == errno.ENOSPC
    fs.commit()  # everything accepted can be stored
    for ino in files[:-1]:
        assert fs.read(ino, 0, 3000) == b"s" * 3000
    for k in range(24):  # each file holds two sectors: together, room for a block again
        fs.unlink(ROOT_INODE, b"s%d" % k)
    x = mkfile(fs, ROOT_INODE, b"x")
    fs.write(x, 0, b"x" * BLOCK)
    fs.commit()


def test_enospc_with_fragmented_free_space(env):
    """Free space in pieces smaller than a block cannot hold a block: writes must be refused
    up front, and commit must always manage to store what was accepted."""
    fs = env.fs
    small = []
    i = 0
    try:  # alternate one-sector files and one-block files until the volume is full
        while True:
            s = mkfile(fs, ROOT_INODE, b"s%d" % i)
            fs.write(s, 0, b"s" * 100)
            fs.commit()
            small.append(b"s%d" % i)
            b = mkfile(fs, ROOT_INODE, b"b%d" % i)
            fs.write(b, 0, b"b" * BLOCK)
            i += 1
    except FSError as exc:
        assert exc.errno == errno.ENOSPC
    fs.commit()
    for name in small:
        fs.unlink(ROOT_INODE, name)
    fs.commit()
    assert fs.alloc.free_count >= len(small) - 2  # plenty of sectors, but in small pieces
    accepted = []
    for j in range(20):
        try:
            f = mkfile(fs, ROOT_INODE, b"n%d" % j)
            fs.write(f, 10, b"n" * 5000)  # a partial block: buffered, stored at commit
            accepted.append(f)
        except FSError as exc:
            assert exc.errno == errno.ENOSPC
    fs.commit()  # never ENOSPC: everything accepted has room
    for f in accepted:
        assert fs.read(f, 0, 5010) == bytes(10) + b"n" * 5000
    assert all(fs.read(fs.lookup(ROOT_INODE, b"b%d" % k).ino, 0, BLOCK) == b"b" * BLOCK
               for k in range(0, i, 7))


def test_allocator_counts_block_pieces():
    import random

    from vfs.alloc import Allocator

    rng = random.Random(3)
    a = Allocator(5000, [(0, 2), (100, 37), (1000, 1)], run=16)
    live: list[tuple[int, int]] = []

    def check():
        assert a.runs == sum(n // 16 for _s, n in a.extents())
        assert a.free_count == sum(n for _s, n in a.extents())

    check()
    for _ in range(3000):
        if live and (rng.random() < 0.45 or a.free_count < 40):
            start, n = live.pop(rng.randrange(len(live)))
            a.free(start, n)
        else:
            sizes = [rng.choice([1, 3, 15, 16, 16, 16]) for _ in range(rng.randint(1, 4))]
            try:
                starts = a.allocate_each(sizes)
            except FSError:
                continue
            live += list(zip(starts, sizes, strict=True))
        check()


# --- rename --------------------------------------------------------------------------------------


@pytest.fixture
def tree(fs):
    """/a/{f, g, sub/{deep}}, /b/{empty/, full/{x}}, /h (file)."""
    t = {}
    t["a"] = fs.mkdir(ROOT_INODE, b"a", 0o755, ROOT).ino
    t["b"] = fs.mkdir(ROOT_INODE, b"b", 0o755, ROOT).ino
    t["f"] = mkfile(fs, t["a"], b"f", b"F")
    t["g"] = mkfile(fs, t["a"], b"g", b"G")
    t["sub"] = fs.mkdir(t["a"], b"sub", 0o755, ROOT).ino
    t["deep"] = fs.mkdir(t["sub"], b"deep", 0o755, ROOT).ino
    t["empty"] = fs.mkdir(t["b"], b"empty", 0o755, ROOT).ino
    t["full"] = fs.mkdir(t["b"], b"full", 0o755, ROOT).ino
    t["x"] = mkfile(fs, t["full"], b"x", b"X")
    t["h"] = mkfile(fs, ROOT_INODE, b"h", b"H")
    return t


def test_rename_within_and_across(fs, tree):
    a, b = tree["a"], tree["b"]
    fs.rename(a, b"f", a, b"f2")
    assert fs.lookup(a, b"f2").ino == tree["f"]
    fs.rename(a, b"f2", b, b"f3")
    assert fs.lookup(b, b"f3").ino == tree["f"]
    assert errno_of(fs.lookup, a, b"f2") == errno.ENOENT
    # a directory moves: link counts of both parents follow, '..' points to the new parent
    fs.rename(a, b"sub", b, b"sub")
    assert fs.getattr(a).nlink == 2 and fs.getattr(b).nlink == 5
    assert fs.lookup(tree["sub"], b"..").ino == b
    assert errno_of(fs.rename, a, b"missing", b, b"z") == errno.ENOENT


def test_rename_over_existing(fs, tree):
    a, b = tree["a"], tree["b"]
    fs.rename(a, b"f", a, b"g")  # file over file: g's inode goes
    assert fs.lookup(a, b"g").ino == tree["f"]
    assert errno_of(fs.getattr, tree["g"]) == errno.ENOENT
    fs.rename(a, b"sub", b, b"empty")  # directory over an empty directory
    assert fs.lookup(b, b"empty").ino == tree["sub"]
    assert errno_of(fs.getattr, tree["empty"]) == errno.ENOENT
    assert fs.getattr(a).nlink == 2 and fs.getattr(b).nlink == 4


def test_rename_errors(fs, tree):
    a, b = tree["a"], tree["b"]
    assert errno_of(fs.rename, a, b"sub", b, b"full") == errno.ENOTEMPTY
    assert errno_of(fs.rename, a, b"f", b, b"empty") == errno.EISDIR
    assert errno_of(fs.rename, b, b"empty", a, b"f") == errno.ENOTDIR
    assert errno_of(fs.rename, ROOT_INODE, b"a", tree["sub"], b"a2") == errno.EINVAL
    assert errno_of(fs.rename, ROOT_INODE, b"a", tree["deep"], b"a2") == errno.EINVAL
    assert errno_of(fs.rename, ROOT_INODE, b"a", tree["a"], b"self") == errno.EINVAL
    assert errno_of(fs.rename, a, b"f", tree["f"], b"x") == errno.ENOTDIR
    assert errno_of(fs.rename, a, b"f", a, b"") == errno.EINVAL
    assert errno_of(fs.rename, a, b"f", a, b"g", 4) == errno.EINVAL
    assert errno_of(fs.rename, a, b"f", a, b"g", RENAME_EXCHANGE | RENAME_NOREPLACE) \
        == errno.EINVAL
    # nothing moved
    assert sorted(names(fs, a)) == [b".", b"..", b"f", b"g", b"sub"]


def test_rename_hard_links_to_each_other(fs, tree):
    a = tree["a"]
    fs.link(tree["f"], a, b"f-link")
    fs.rename(a, b"f", a, b"f-link")  # same inode: nothing happens
    assert fs.lookup(a, b"f").ino == fs.lookup(a, b"f-link").ino == tree["f"]
    assert fs.getattr(tree["f"]).nlink == 2


def test_rename_noreplace(fs, tree):
    a = tree["a"]
    assert errno_of(fs.rename, a, b"f", a, b"g", RENAME_NOREPLACE) == errno.EEXIST
    fs.rename(a, b"f", a, b"new", RENAME_NOREPLACE)
    assert fs.lookup(a, b"new").ino == tree["f"]


def test_rename_exchange(fs, tree):
    a, b = tree["a"], tree["b"]
    assert errno_of(fs.rename, a, b"f", a, b"none", RENAME_EXCHANGE) == errno.ENOENT
    fs.rename(a, b"f", a, b"g", RENAME_EXCHANGE)
    assert fs.lookup(a, b"f").ino == tree["g"] and fs.lookup(a, b"g").ino == tree["f"]
    # a file and a directory in different parents trade places; link counts follow
    fs.rename(a, b"sub", ROOT_INODE, b"h", RENAME_EXCHANGE)
    assert fs.lookup(ROOT_INODE, b"h").ino == tree["sub"]
    assert fs.lookup(a, b"sub").ino == tree["h"]
    assert fs.getattr(a).nlink == 2 and fs.getattr(ROOT_INODE).nlink == 5
    assert fs.lookup(tree["sub"], b"..").ino == ROOT_INODE
    # full and empty directories swap even when not empty
    fs.rename(b, b"full", b, b"empty", RENAME_EXCHANGE)
    assert fs.lookup(b, b"empty").ino == tree["full"]
    assert errno_of(fs.rename, ROOT_INODE, b"b", tree["full"], b"x", RENAME_EXCHANGE) \
        == errno.EINVAL


# --- attributes and times ------------------------------------------------------------------------


def test_chmod_chown_and_ctime(fs):
    f = mkfile(fs, ROOT_INODE, b"f", b"x")
    a0 = fs.getattr(f)
    a = fs.setattr(f, SetAttr(mode=0o4751))
    assert a.mode == stat.S_IFREG | 0o4751 and a.ctime_ns >= a0.ctime_ns
    assert a.mtime_ns == a0.mtime_ns
    a = fs.setattr(f, SetAttr(uid=7, gid=8))
    assert (a.uid, a.gid) == (7, 8)
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    a = fs.setattr(d, SetAttr(mode=0o1777 | stat.S_IFREG))  # file type bits cannot change
    assert a.mode == stat.S_IFDIR | 0o1777


def test_utimens_nanoseconds(fs):
    f = mkfile(fs, ROOT_INODE, b"f", b"x")
    a = fs.setattr(f, SetAttr(atime_ns=1_234_567_890_123_456_789, mtime_ns=987_654_321))
    assert a.atime_ns == 1_234_567_890_123_456_789 and a.mtime_ns == 987_654_321
    a2 = fs.setattr(f, SetAttr(mtime_ns=5))  # atime omitted: unchanged
    assert a2.atime_ns == 1_234_567_890_123_456_789 and a2.mtime_ns == 5
    assert a2.ctime_ns >= a.ctime_ns


def test_time_rules(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    old = 1_000_000_000
    fs.setattr(d, SetAttr(mtime_ns=old, atime_ns=old))
    f = mkfile(fs, d, b"f")
    assert fs.getattr(d).mtime_ns > old  # creating a name changes the directory
    fs.setattr(f, SetAttr(mtime_ns=old, atime_ns=old))
    fs.setattr(d, SetAttr(mtime_ns=old))
    t = fs.getattr(f).ctime_ns
    fs.write(f, 0, b"data")
    a = fs.getattr(f)
    assert a.mtime_ns > old and a.ctime_ns >= t
    assert fs.getattr(d).mtime_ns == old  # writing a file does not change its directory
    fs.setattr(f, SetAttr(mtime_ns=old, atime_ns=old))
    fs.read(f, 0, 4)
    assert fs.getattr(f).atime_ns > old  # relatime: atime older than mtime is updated
    atime = fs.getattr(f).atime_ns
    fs.read(f, 0, 4)
    assert fs.getattr(f).atime_ns == atime  # ...but not on every read
    fs.setattr(f, SetAttr(mtime_ns=old))
    fs.setattr(f, SetAttr(size=2))  # truncation sets mtime
    assert fs.getattr(f).mtime_ns > old
    fs.setattr(f, SetAttr(mtime_ns=old))
    fs.setattr(f, SetAttr(size=2))  # ...even to the same size (as ext4)
    assert fs.getattr(f).mtime_ns > old
    fs.setattr(d, SetAttr(atime_ns=old, mtime_ns=old + 1))
    names(fs, d)  # listing a directory is reading it (relatime)
    assert fs.getattr(d).atime_ns > old
    s = fs.symlink(d, b"s", b"f", ROOT).ino
    fs.setattr(s, SetAttr(atime_ns=old, mtime_ns=old + 1))
    fs.readlink(s)
    assert fs.getattr(s).atime_ns > old
    fs.unlink(d, b"s")
    fs.setattr(f, SetAttr(mtime_ns=old))
    c = fs.getattr(f).ctime_ns
    fs.setxattr(f, b"user.a", b"1")  # xattrs change ctime, not mtime
    assert fs.getattr(f).mtime_ns == old and fs.getattr(f).ctime_ns >= c
    fs.setattr(d, SetAttr(mtime_ns=old))
    fs.rename(d, b"f", d, b"g")
    assert fs.getattr(d).mtime_ns > old
    fs.setattr(d, SetAttr(mtime_ns=old))
    fs.unlink(d, b"g")
    assert fs.getattr(d).mtime_ns > old


def test_setgid_directory_inheritance(fs):
    d = fs.mkdir(ROOT_INODE, b"d", 0o2775, ROOT).ino
    fs.setattr(d, SetAttr(gid=500))
    f = fs.create(d, b"f", 0o644, os.O_RDWR, USER)
    fs.release(f.ino)
    assert f.gid == 500 and f.uid == 1000 and not f.mode & stat.S_ISGID
    sub = fs.mkdir(d, b"sub", 0o755, USER)
    assert sub.gid == 500 and sub.mode & stat.S_ISGID
    deeper = fs.mkdir(sub.ino, b"deeper", 0o700, USER)
    assert deeper.gid == 500 and deeper.mode & stat.S_ISGID
    n = fs.mknod(d, b"p", stat.S_IFIFO | 0o644, 0, USER)
    assert n.gid == 500
    # outside a setgid directory the creator's group is used
    plain = fs.mkdir(ROOT_INODE, b"plain", 0o777, ROOT).ino
    g = fs.create(plain, b"g", 0o644, os.O_RDWR, USER)
    fs.release(g.ino)
    assert g.gid == 1000
    # setgid on a new group-executable file in a setgid dir of a group the caller is not in:
    # cleared (the kernel's inode_init_owner / mode_strip_sgid rule)
    e = fs.create(d, b"exe", 0o2755, os.O_RDWR, USER)
    fs.release(e.ino)
    assert not e.mode & stat.S_ISGID
    member = Caller(1000, 1000, (500,))
    e2 = fs.create(d, b"exe2", 0o2755, os.O_RDWR, member)
    fs.release(e2.ino)
    assert e2.mode & stat.S_ISGID
    # without group execute the bit is kept (it is not a setgid program)
    e3 = fs.create(d, b"lock", 0o2644, os.O_RDWR, USER)
    fs.release(e3.ino)
    assert e3.mode & stat.S_ISGID


# --- extended attributes -------------------------------------------------------------------------


def test_xattrs(fs):
    f = mkfile(fs, ROOT_INODE, b"f")
    assert fs.listxattr(f) == []
    assert errno_of(fs.getxattr, f, b"user.a") == errno.ENODATA
    assert errno_of(fs.removexattr, f, b"user.a") == errno.ENODATA
    assert errno_of(fs.setxattr, f, b"user.a", b"1", XATTR_REPLACE) == errno.ENODATA
    fs.setxattr(f, b"user.a", b"1", XATTR_CREATE)
    assert errno_of(fs.setxattr, f, b"user.a", b"2", XATTR_CREATE) == errno.EEXIST
    fs.setxattr(f, b"user.a", b"2", XATTR_REPLACE)
    assert fs.getxattr(f, b"user.a") == b"2"
    fs.setxattr(f, b"user.empty", b"")
    assert fs.getxattr(f, b"user.empty") == b""
    fs.setxattr(f, b"trusted.t", b"T")
    fs.setxattr(f, b"security.s", b"S")
    assert sorted(fs.listxattr(f)) == [b"security.s", b"trusted.t", b"user.a", b"user.empty"]
    fs.removexattr(f, b"user.a")
    assert errno_of(fs.getxattr, f, b"user.a") == errno.ENODATA
    assert errno_of(fs.setxattr, f, b"other.x", b"1") == errno.EOPNOTSUPP
    assert errno_of(fs.getxattr, f, b"other.x") == errno.EOPNOTSUPP
    assert errno_of(fs.setxattr, f, b"user.", b"1") == errno.EINVAL
    assert errno_of(fs.setxattr, f, b"user." + b"n" * 251, b"1") == errno.ERANGE
    fs.setxattr(f, b"user." + b"n" * 250, b"v" * 65536)
    assert errno_of(fs.setxattr, f, b"user.big", b"v" * 65537) == errno.E2BIG
    d = fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    fs.setxattr(d, b"user.dir", b"yes")
    assert fs.getxattr(d, b"user.dir") == b"yes"
    # attributes go with their inode
    fs.unlink(ROOT_INODE, b"f")
    assert fs.db.value("SELECT count(*) FROM xattrs WHERE inode=?", (f,)) == 0


# --- whole filesystem ----------------------------------------------------------------------------


def test_statfs(env, fs):
    s = fs.statfs()
    assert s["bsize"] == s["frsize"] == SECTOR
    assert s["namemax"] == NAME_MAX
    assert 0 < s["bfree"] <= s["blocks"] <= env.vol.capacity // SECTOR
    assert s["bavail"] == s["bfree"]
    reserve = fs.copy_reserve  # held for the next metadata copy: it follows the database's size
    f = mkfile(fs, ROOT_INODE, b"f", os.urandom(10 * BLOCK))
    fs.commit()
    s2 = fs.statfs()
    assert s2["bfree"] == s["bfree"] - 10 * BLOCK // SECTOR - (fs.copy_reserve - reserve)
    assert s2["files"] - s2["ffree"] == 2  # root and f
    fs.unlink(ROOT_INODE, b"f")
    fs.commit()
    assert fs.statfs()["bfree"] == s["bfree"] - (fs.copy_reserve - reserve)
    assert abs(fs.copy_reserve - reserve) <= 2
    assert errno_of(fs.getattr, f) == errno.ENOENT


# --- random contents against a model ------------------------------------------------------------


def test_random_contents_against_model(env):
    """Random writes, truncations, commits, crashes and reopens of a few files; every read
    must match a byte model (what was committed survives a crash, the rest is lost)."""
    import random

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.tuples(
        st.sampled_from(["write", "write", "write", "truncate", "commit", "crash", "reopen",
                         "read"]),
        st.integers(0, 2),  # which file
        st.sampled_from([0, 1, 4095, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 7,
                         5 * BLOCK, 4 * GiB - 3]),
        st.sampled_from([1, 100, 4096, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK]),
        st.integers(0, 255),
    ), min_size=1, max_size=40)
    counter = iter(range(10**6))

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=ops)
    def run(ops):
        fs = env.fs
        tag = next(counter)
        inos = [mkfile(fs, ROOT_INODE, b"m%d-%d" % (tag, i)) for i in range(3)]
        fs.commit()
        model = [{} for _ in inos]  # offset-sparse model: dict of runs is overkill; use bytes
        size = [0, 0, 0]
        committed = None

        def snapshot():
            return [dict(m) for m in model], list(size)

        committed = snapshot()
        rng = random.Random(tag)

        def model_read(i, off, n):
            end = min(size[i], off + n)
            return bytes(model[i].get(p, 0) for p in range(off, end)) if end > off else b""

        for op, i, off, n, byte in ops:
            fs = env.fs
            if op == "write":
                data = bytes([byte]) * n if byte else bytes(n)
                fs.write(inos[i], off, data)
                for p in range(off, off + n):
                    if byte:
                        model[i][p] = byte
                    else:
                        model[i].pop(p, None)
                size[i] = max(size[i], off + n)
            elif op == "truncate":
                new = off + (n if byte % 2 else 0)
                fs.setattr(inos[i], SetAttr(size=new))
                for p in [p for p in model[i] if p >= new]:
                    del model[i][p]
                size[i] = new
            elif op == "commit":
                fs.commit()
                committed = snapshot()
            elif op in ("crash", "reopen"):
                if op == "crash":
                    env.close(clean=False)
                    env.open()
                    model[:], size[:] = committed[0], committed[1]
                    committed = snapshot()
                else:
                    env.reopen()
                    committed = snapshot()
            else:
                ro = rng.choice([0, off, max(0, size[i] - n)])
                assert env.fs.read(inos[i], ro, n) == model_read(i, ro, n)
            fs = env.fs
            assert fs.getattr(inos[i]).size == size[i]
        for i, ino in enumerate(inos):
            for p in sorted(model[i])[:50] + [max(0, size[i] - 10)]:
                assert env.fs.read(ino, p, 10) == model_read(i, p, 10)
            env.fs.unlink(ROOT_INODE, b"m%d-%d" % (tag, i))
        env.fs.commit()

    run()


def test_allocator_guard_keeps_writes_out_of_stripes_parity_alone_holds(caplog):
    """While degraded, new data stays out of stripes where parity alone holds a chunk in use
    (stripes of 48 sectors; the missing member's data chunk is sectors 16-31 of each), lands
    where that chunk is free or wholly overwritten, and goes there anyway only when nothing
    else is free (with a warning)."""
    from vfs.alloc import Allocator

    def guard(start: int, count: int) -> list[tuple[int, int, int]]:
        first, last = start // 48, (start + count - 1) // 48
        return [(s * 48 + 16, 16, s * 48 + 48) for s in range(first, last + 1)]

    # Stripe 0's missing chunk is in use; everything else is free.
    a = Allocator(48 * 4, [(16, 16)], run=16)
    a.guard = guard
    assert a.allocate_each([4]) == [48]  # not 0: stripe 0 only has parity for sectors 16-31
    assert a.allocate_each([16]) == [52]  # stripe 1's missing chunk is free: it may go there
    assert a.allocate_each([8]) == [96]  # stripe 1's is now taken (52-67) and not overwritten
    # Stripe 2's missing chunk (112-127) wholly overwritten, stripe 3's (160-175) still free.
    assert a.allocate_each([48]) == [104]
    assert a.allocate_each([4]) == [152]  # not 68: stripe 1's missing chunk is in use
    with caplog.at_level(logging.WARNING, logger="vfs.alloc"):
        rest = a.free_count
        starts = a.allocate_each([1] * rest)  # nothing else is left: no ENOSPC for that
    assert len(starts) == rest and a.free_count == 0
    assert "degraded and full" in caplog.text


def test_parity_only_chunks_name_the_missing_members_data(tmp_path):
    paths, uuid, g = build(tmp_path / "a", "raidz2", 5, 4096, rows=20)
    vol = open_vol(paths, uuid)
    assert vol.parity_only_chunks(0, g.capacity) == []  # every member is there
    close_members(vol)
    os.unlink(paths[3])
    vol = open_vol(paths, uuid)
    got = vol.parity_only_chunks(0, g.capacity)
    want = []
    for stripe in range(g.stripes):
        group, row = g.locate(stripe)
        cols = g.column_slots(group, row)
        if 3 in cols[: g.k]:
            c = cols.index(3)
            want.append((stripe * g.stripe_bytes + c * 4096, 4096, (stripe + 1) * g.stripe_bytes))
    assert got == want and 0 < len(want) < g.stripes  # (slot 3 holds parity in some rows)
    assert vol.parity_only_chunks(g.stripe_bytes, 1) == [w for w in want
                                                        if w[2] == 2 * g.stripe_bytes]
    vol.close()


def test_free_space_names_only_what_no_file_or_copy_uses(env, fs):
    """What scrub may rewrite: never a file's sectors, the superblocks or the metadata copy;
    a deleted file's sectors only once the commit that frees them is durable; the same answers
    from an unmounted filesystem's committed metadata."""
    from vfs.freespace import RESERVED_SECTORS, FreeSpace, used_sectors

    ino = mkfile(fs, ROOT_INODE, b"f", rand_bytes(7, 5 * BLOCK))
    fs.commit()
    space = fs.free_space()
    assert space.lock is fs.lock
    exts = list(fs.db.rows("SELECT addr, nsect FROM extents WHERE inode=?", (ino,)))
    assert exts
    used = sorted(used_sectors(fs.db))
    assert used[0] == (0, RESERVED_SECTORS)
    for addr, n in used:
        assert not space.unused(addr * SECTOR, n * SECTOR)
        assert not space.unused(addr * SECTOR + n * SECTOR - 1, 1)  # its last byte
        assert not space.unused(max(0, addr - 1) * SECTOR, 2 * SECTOR)  # straddling its start
    gaps = fs.alloc.extents()
    start, count = gaps[-1]
    assert space.unused(start * SECTOR, count * SECTOR)
    assert not space.unused(start * SECTOR, count * SECTOR + 1)  # past the end of the volume
    assert space.unused(start * SECTOR + 100, 5000)  # bytes within sectors
    fs.unlink(ROOT_INODE, b"f")
    for addr, n in exts:  # freed, but the committed metadata still points there
        assert not space.unused(addr * SECTOR, n * SECTOR)
    fs.commit()
    for addr, n in exts:
        assert space.unused(addr * SECTOR, n * SECTOR)
    unmounted = FreeSpace.committed(fs.db, fs.volume.capacity)
    for addr, n in used_sectors(fs.db):
        assert not unmounted.unused(addr * SECTOR, n * SECTOR)
    for addr, n in exts:
        assert unmounted.unused(addr * SECTOR, n * SECTOR)


def test_sectors_below_the_floor_are_never_handed_out():
    from vfs.alloc import Allocator

    a = Allocator(100, [(0, 4), (10, 5), (20, 4)], run=4)
    a.keep_out_below(22)  # over used and free sectors alike, ending inside a used extent
    assert a.extents() == [(24, 76)]
    assert a.free_count == 76 and a.runs == 76 // 4
    assert not a.is_free(4, 1) and a.is_free(24, 76)
    a.free(10, 5)  # a file there is deleted: its sectors stay out of use
    a.hold(20, 4)
    a.release()  # one straddling the floor: only its part above comes back
    assert a.extents() == [(22, 78)] and a.free_count == 78
    assert a.allocate_each([78]) == [22]
    b = Allocator(100, [(40, 10)], run=4)
    b.keep_out_below(45)  # past the end of the first free extent, inside a used one
    assert b.extents() == [(50, 50)] and b.free_count == 50 and b.runs == 12
    c = Allocator(100, [], run=4)
    c.keep_out_below(30)  # inside a free extent
    assert c.extents() == [(30, 70)] and c.free_count == 70 and c.runs == 17


def test_new_data_keeps_out_of_the_superblock_stripe(env, fs):
    """Superblocks are rewritten in place: no file's sector shares their stripe."""
    stripe = env.vol.stripe_bytes
    assert stripe > RESERVED_SECTORS * SECTOR  # the test needs stripe room past them
    for i in range(20):
        mkfile(fs, ROOT_INODE, f"f{i}".encode(), rand_bytes(i, 3 * SECTOR))
    fs.commit()
    addrs = [a for a, in fs.db.rows("SELECT addr FROM extents")]
    assert addrs and min(addrs) * SECTOR >= stripe
    fs2 = env.reopen()
    mkfile(fs2, ROOT_INODE, b"g", rand_bytes(99, SECTOR))
    fs2.commit()
    assert min(a for a, in fs2.db.rows("SELECT addr FROM extents")) * SECTOR >= stripe


def test_metadata_statements_are_not_replanned_for_each_run(tmp_path):
    """The metadata connection plans a statement once, whatever values are bound: this SQLite
    otherwise re-prepares every statement with ORDER BY and a bound range at each run (readdir,
    the block-map lookup of every read), at several times the cost of the query itself."""
    import apsw

    path = str(tmp_path / "meta.db")
    for db in (MetaDB(path, create=True), MetaDB(path, read_only=True)):
        try:
            assert db.conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, -1) == 1
        finally:
            db.close()


def test_a_database_from_before_ghost_links_gets_them_once(tmp_path):
    """A format-3 database made before ghost_links (no table, a trigger that does not clear
    it) gets both at its first read-write open; later opens change nothing (fsck without
    --repair must not write)."""
    import hashlib

    import apsw

    path = str(tmp_path / "meta.db")
    db = MetaDB(path, create=True)
    db.commit()
    db.close()
    old = apsw.Connection(path)
    old.execute("DROP TRIGGER inodes_gone; DROP TABLE ghost_links; "
                "CREATE TRIGGER inodes_gone AFTER DELETE ON inodes BEGIN "
                "DELETE FROM xattrs WHERE inode = old.id; "
                "DELETE FROM ghosts WHERE inode = old.id; END;")
    old.close()
    db = MetaDB(path)
    sql = db.value("SELECT sql FROM sqlite_master WHERE name='inodes_gone'", (), "")
    assert "ghost_links" in sql
    db.change("INSERT INTO inodes (id, mode, nlink, uid, gid, atime_ns, mtime_ns, ctime_ns) "
              "VALUES (7, ?, 1, 0, 0, 0, 0, 0)", (stat.S_IFLNK | 0o777,))
    db.change("INSERT INTO ghost_links (inode) VALUES (7)")
    db.change("DELETE FROM inodes WHERE id=7")
    assert db.value("SELECT count(*) FROM ghost_links", (), -1) == 0
    db.commit()
    db.close()
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    MetaDB(path).close()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
