"""The kernel's FUSE protocol (`linux/fuse.h`, version 7.39): opcodes, flags and struct layouts.

Only what dwfs speaks is here. Every struct is little-endian and packed as the kernel lays it
out; names follow the kernel's with the `fuse_` prefix dropped.
"""

from __future__ import annotations

import functools
import os
import struct

from vfs.attrs import Attr

KERNEL_MAJOR = 7
KERNEL_MINOR = 39  # the protocol dwfs speaks; the replies below have its sizes
# The oldest kernel protocol dwfs works with: 7.31 to 7.39 have the same sizes for what dwfs
# speaks (the flags and extensions of 7.36 and 7.38 come only when asked for); without
# HANDLE_KILLPRIV_V2 (7.33) the kernel clears setid bits itself, and without 7.39 it never
# sends STATX, so stat shows no birth time.
OLDEST_KERNEL_MINOR = 31
ROOT_ID = 1
DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t): attach a new /dev/fuse to a connection

# --- opcodes ----------------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR = 17, 18, 20, 21, 22, 23
REMOVEXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 24, 25, 26, 27, 28, 29
FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY, IOCTL = 30, 34, 35, 36, 38, 39
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK = 42, 43, 44, 45, 46
COPY_FILE_RANGE, COPY_FILE_RANGE_64 = 47, 53  # the second (Linux 6.18) answers 64 bits
TMPFILE = 51  # O_TMPFILE (Linux 6.1): create_in and the name "/"; answered as CREATE
STATX = 52  # statx(2) asking for what getattr lacks (the birth time); protocol 7.39

# --- INIT flags (those dwfs asks for) ---------------------------------------------------------
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3  # open() gets O_TRUNC instead of a separate truncating setattr
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
# The filesystem clears set-user-ID and set-group-ID on writes, truncations and chowns where
# the kernel flags them (below); the kernel then marks files without those bits or
# security.capability S_NOSEC and stops asking for security.capability before every write.
HANDLE_KILLPRIV_V2 = 1 << 28
DONT_MASK = 1 << 6  # the filesystem applies the umask (it sees default ACLs)
POSIX_ACL = 1 << 20  # the kernel checks ACLs (system.posix_acl_* attributes)

# --- SETATTR valid bits -----------------------------------------------------------------------
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 128, 256
FATTR_CTIME = 1024
FATTR_KILL_SUIDGID = 1 << 11  # a truncation or chown that clears setid bits
WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags: this write clears setid bits
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in.open_flags: this O_TRUNC clears setid bits

# --- open reply flags -------------------------------------------------------------------------
FOPEN_KEEP_CACHE = 1 << 1

# --- notifications (written with unique 0 and the code in the error field) -------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# --- structs ----------------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# ino size blocks atime mtime ctime (seconds, signed: before 1970 is negative) nsecs mode...
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+ nsecs)
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
ENTRY_WITH_ATTR = struct.Struct(ENTRY_OUT.format + ATTR.format[1:])  # one pack for the reply
ATTR_OUT_WITH_ATTR = struct.Struct(ATTR_OUT.format + ATTR.format[1:])
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
OPEN_IN = struct.Struct("<II")  # flags open_flags
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
STATX_IN = struct.Struct("<IIQII")  # getattr_flags reserved fh sx_flags sx_mask
# fuse_statx_out: attr_valid attr_valid_nsec flags spare[2], then struct fuse_statx: mask
# blksize attributes nlink uid gid mode spare ino size blocks attributes_mask, atime btime
# ctime mtime (seconds, nanoseconds, reserved each), rdev and dev (major, minor), spare[14]
STATX_OUT = struct.Struct("<QII16x" "IIQIIIH2xQQQQ" "qIi" "qIi" "qIi" "qIi" "IIII112x")
STATX_BASIC_STATS, STATX_BTIME = 0x7FF, 0x800
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")  # times in signed seconds, as ATTR
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
COPY_FILE_RANGE_OUT = struct.Struct("<Q")  # bytes copied (COPY_FILE_RANGE_64)
LSEEK_OUT = struct.Struct("<Q")  # offset
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")  # result flags in_iovs out_iovs
# The ioctls dwfs answers (linux/fs.h): chattr's flags as lsattr/chattr and xfs_io see them.
# The kernel sends them with an int (its fileattr calls), or as a program gave them.
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IOC32_GETFLAGS, FS_IOC32_SETFLAGS = 0x80046601, 0x40046602
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
FSXATTR = struct.Struct("<IIIII8x")  # xflags extsize nextents projid cowextsize pad
SETXATTR_IN = struct.Struct("<II")  # size flags
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen padding

NSEC = 1_000_000_000


def _attr_fields(a: Attr) -> tuple[int, ...]:
    """The fields of `struct fuse_attr` of a vfs Attr, in order."""
    at, atn = divmod(a.atime_ns, NSEC)
    mt, mtn = divmod(a.mtime_ns, NSEC)
    ct, ctn = divmod(a.ctime_ns, NSEC)
    return (a.ino, a.size, a.blocks, at, mt, ct, atn, mtn, ctn, a.mode, a.nlink, a.uid, a.gid,
            a.rdev, a.blksize, 0)


@functools.cache
def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * NSEC)


def pack_entry(a: Attr, entry_seconds: float, attr_seconds: float) -> bytes:
    """`struct fuse_entry_out`: a name's inode and attributes, with how long to cache each."""
    es, ens = _split(entry_seconds)
    as_, ans = _split(attr_seconds)
    return ENTRY_WITH_ATTR.pack(a.ino, 0, es, as_, ens, ans, *_attr_fields(a))


def pack_negative_entry(entry_seconds: float) -> bytes:
    """`struct fuse_entry_out` for a missing name that the kernel may remember as missing."""
    es, ens = _split(entry_seconds)
    return ENTRY_OUT.pack(0, 0, es, 0, ens, 0) + bytes(ATTR.size)


def pack_statx_out(a: Attr, btime_ns: int | None, attr_seconds: float) -> bytes:
    """`struct fuse_statx_out`: the attributes with the birth time (None: unknown, left out of
    the mask)."""
    s, ns = _split(attr_seconds)
    at, atn = divmod(a.atime_ns, NSEC)
    mt, mtn = divmod(a.mtime_ns, NSEC)
    ct, ctn = divmod(a.ctime_ns, NSEC)
    bt, btn = divmod(btime_ns or 0, NSEC)
    mask = STATX_BASIC_STATS | (STATX_BTIME if btime_ns is not None else 0)
    return STATX_OUT.pack(s, ns, 0, mask, a.blksize, 0, a.nlink, a.uid, a.gid, a.mode, a.ino,
                          a.size, a.blocks, 0, at, atn, 0, bt, btn, 0, ct, ctn, 0, mt, mtn, 0,
                          os.major(a.rdev), os.minor(a.rdev), 0, 0)


def pack_attr_out(a: Attr, attr_seconds: float) -> bytes:
    """`struct fuse_attr_out`."""
    s, ns = _split(attr_seconds)
    return ATTR_OUT_WITH_ATTR.pack(s, ns, 0, *_attr_fields(a))


def pack_dirent(ino: int, next_offset: int, name: bytes, mode: int) -> bytes:
    """`struct fuse_dirent` with its name, padded to 8 bytes."""
    raw = DIRENT.pack(ino, next_offset, len(name), (mode >> 12) & 0o17) + name
    return raw + bytes(-len(raw) % 8)


def split_names(body: bytes, count: int) -> list[bytes]:
    """The first `count` NUL-terminated names of a request body."""
    return body.split(b"\0", count)[:count]
