"""Helpers for POSIX tests on a mount: the errno a call fails with, renameat2,
getxattr/listxattr with a given buffer size, chattr's flags, and running a function as another
user in a forked child."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import pickle
import stat
import struct
import traceback

import pytest

NOBODY = 65534
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def errno_of(func, *args, **kw) -> int:
    """The errno `func(*args)` fails with (fails the test if it succeeds)."""
    with pytest.raises(OSError) as exc:
        func(*args, **kw)
    return exc.value.errno


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(fd: int, size: int) -> int:
    """How many of the first `size` bytes' pages of open file `fd` are in the page cache
    (mincore(2) on a private mapping that is never written; mapping an open file opens
    nothing anew)."""
    m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    try:
        n = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return sum(v & 1 for v in vec)
    finally:
        m.close()


FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_COLLAPSE_RANGE, FALLOC_ZERO_RANGE = 1, 2, 8, 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module lacks."""
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


AT_EMPTY_PATH = 0x1000


def link_fd(fd: int, new: str) -> None:
    """linkat(fd, "", AT_FDCWD, new, AT_EMPTY_PATH): name an open file (root only)."""
    if _libc.linkat(fd, b"", AT_FDCWD, new.encode(), AT_EMPTY_PATH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), new)


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
                ("spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                # atime, btime, ctime, mtime: (tv_sec, tv_nsec, reserved) each; the rest of the
                # kernel's 256 bytes, with room to spare
                ("times", (ctypes.c_int64 * 2) * 4), ("rest", ctypes.c_uint8 * 384)]


STATX_BTIME = 0x800
AT_SYMLINK_NOFOLLOW = 0x100


def birth_time(path: str, follow: bool = True) -> int | None:
    """statx(2)'s birth time of `path` in nanoseconds; None if the filesystem gives none."""
    sx = _Statx()
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _libc.statx(-100, os.fsencode(path), flags, STATX_BTIME | 0x7FF, ctypes.byref(sx)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    if not sx.mask & STATX_BTIME:
        return None
    sec, rest = sx.times[1][0], sx.times[1][1]
    return sec * 1_000_000_000 + (rest & 0xFFFFFFFF)


def c_getxattr(path: str, name: str, size: int) -> int:
    """getxattr(2) with a caller-chosen buffer size; returns the length or raises."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(path.encode(), name.encode(), buf if size else None,
                       ctypes.c_size_t(size))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return n


def c_listxattr(path: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.listxattr(path.encode(), buf if size else None, ctypes.c_size_t(size))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return n


def as_user(func, uid: int = NOBODY, gid: int = NOBODY, groups: tuple[int, ...] = ()):
    """Run `func()` in a forked child as another user; returns its result or re-raises its
    OSError (with the same errno)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(0o022)
            try:
                result = ("ok", func())
            except OSError as exc:
                result = ("oserror", exc.errno, str(exc))
            except BaseException:  # noqa: BLE001 - reported to the parent
                result = ("error", traceback.format_exc())
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "child failed"
    result = pickle.loads(data)
    if result[0] == "oserror":
        raise OSError(result[1], result[2])
    if result[0] == "error":
        raise AssertionError("in the child:\n" + result[1])
    return result[1]


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
IMMUTABLE, APPEND, NODUMP, NOATIME = 0x10, 0x20, 0x40, 0x80
KEPT = IMMUTABLE | APPEND | NODUMP | NOATIME  # what dwfs keeps (ext4 shows more, such as extents)


def get_flags(path: str) -> int:
    """chattr's flags of `path` among those dwfs keeps (FS_IOC_GETFLAGS)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("<i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0] & KEPT
    finally:
        os.close(fd)


def set_flags(path: str, flags: int) -> None:
    """Set `flags` among the kept ones, leaving the file's others (ext4's extents) as they are."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        old = struct.unpack("<i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<i", (old & ~KEPT) | flags))
    finally:
        os.close(fd)


def clear_flags(root: str) -> None:
    """Take immutable and append-only off every file and directory under `root` (and `root`),
    so that the tree can be removed."""
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            mode = os.lstat(path).st_mode
            if (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and get_flags(path) & (IMMUTABLE
                                                                               | APPEND):
                set_flags(path, 0)
