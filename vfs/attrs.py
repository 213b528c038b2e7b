"""Plain records exchanged with the filesystem (attributes, attribute changes, the caller)
and the rule every name must follow."""

from __future__ import annotations

import errno
import stat
import time
from dataclasses import dataclass, field

from vfs.errors import FSError

ROOT_INODE = 1
NAME_MAX = 255


@dataclass(slots=True)
class Attr:
    """What stat(2) shows of an inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blocks: int  # 512-byte units actually stored
    blksize: int


TIME_MIN_NS, TIME_MAX_NS = -(1 << 63), (1 << 63) - 1  # times stored: 1677 to 2262


def clamp_time(ns: int) -> int:
    """A time in nanoseconds brought into the range stored (as the kernel clamps a time to
    what a filesystem keeps)."""
    return min(max(ns, TIME_MIN_NS), TIME_MAX_NS)


def without_setid(mode: int) -> int:
    """`mode` as a write, truncation or chown by a process without CAP_FSETID leaves it:
    set-user-ID cleared, and set-group-ID where group execute is set (without it, the bit
    marks mandatory locking and stays), as the kernel's VFS does."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


@dataclass(slots=True)
class SetAttr:
    """The attribute changes of one setattr call; None means unchanged. Times are clamped to
    the range stored."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    kill_setid: bool = False  # clear set-user-ID and set-group-ID (see without_setid)
    times_set: bool = True  # the times given were chosen by the caller, not "now"

    @property
    def explicit_times(self) -> bool:
        """True if a time is set to a chosen value (utimensat with times, not `touch`)."""
        return self.times_set and (self.atime_ns is not None or self.mtime_ns is not None)

    def __post_init__(self) -> None:
        for name in ("atime_ns", "mtime_ns", "ctime_ns"):
            ns = getattr(self, name)
            if ns is not None:
                setattr(self, name, clamp_time(ns))


@dataclass(slots=True)
class Caller:
    """Who asks: user, primary group, supplementary groups and umask-applied creation."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = field(default_factory=tuple)
    umask: int | None = None  # to apply to a new file's mode (None: already applied)

    def in_group(self, gid: int) -> bool:
        """True if the caller belongs to group `gid`."""
        return gid == self.gid or gid in self.groups


@dataclass(slots=True)
class DirEntry:
    """One readdir entry and the cookie that resumes after it."""

    name: bytes
    attr: Attr
    next_cookie: int


def check_name(name: bytes) -> None:
    """Refuse names the filesystem cannot hold."""
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, f"name of {len(name)} bytes (limit {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name:
        raise FSError(errno.EINVAL, f"invalid name {name!r}")


def moment_text(epoch_seconds: float) -> str:
    """A past moment as local time and age: "2026-11-29 20:30:05 (3.2 h ago)"."""
    age = max(0.0, time.time() - epoch_seconds)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_seconds))
    return f"{when} ({_span(age)} ago)"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
