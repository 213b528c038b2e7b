"""Filesystem methods that make inodes and names: mknod, mkdir, create, symlink, link, and
O_TMPFILE's nameless files."""

from __future__ import annotations

import errno
import os
import stat

from vfs.attrs import Attr, Caller, check_name
from vfs.errors import FSError
from vfs.ops import now_ns, operation

LINK_MAX = 65000


class MakeOps:
    """Creating inodes and names for Filesystem (a mixin: it uses the inode, name and xattr
    helpers of Filesystem)."""

    def _make(self, parent: int, name: bytes | None, mode: int, caller: Caller, rdev: int = 0,
              target: bytes | None = None) -> Attr:
        """Make an inode in directory `parent` and name it `name`; with no name it has no
        links (O_TMPFILE) and the directory is not changed."""
        if name is not None:
            check_name(name)
        self.check_metadata_room()
        p = self._live_dir(parent)
        if name is not None and self._entry(parent, name) is not None:
            raise FSError(errno.EEXIST, f"{name!r} exists in directory {parent}")
        self.refuse_new_name(parent)
        gid = caller.gid
        if p[1] & stat.S_ISGID:
            gid = p[4]
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        setgid_exec = stat.S_ISGID | stat.S_IXGRP
        if (not stat.S_ISDIR(mode) and mode & setgid_exec == setgid_exec and caller.uid != 0
                and not caller.in_group(gid)):
            mode &= ~stat.S_ISGID  # as the kernel's mode_strip_sgid
        mode, lists = self._acl_for_new(parent, mode, caller.umask)
        now = now_ns()
        is_dir = stat.S_ISDIR(mode)
        links = 0 if name is None else 2 if is_dir else 1
        self.db.change(
            "INSERT INTO inodes (mode, nlink, uid, gid, size, rdev, atime_ns, mtime_ns, "
            "ctime_ns, btime_ns, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mode, links, caller.uid, gid, len(target) if target else 0, rdev,
             now, now, now, now, target))
        ino = self.db.last_id()
        self._put_xattrs(ino, lists)
        if name is not None:
            self.db.change("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                           (parent, name, ino))
            if is_dir:
                self._add_links(parent, 1)
            self._touch(parent, now=now)
        attr = self._attr(self._row(ino))
        self.inherit_flags(parent, ino)  # last: its in-memory entry must not outlive a failure
        return attr

    @operation
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        """Create a regular file, FIFO, socket or device node."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FSError(errno.EINVAL, f"mknod of file type {kind:o}")
        keep_rdev = rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return self._make(parent, name, kind | (mode & 0o7777), caller, rdev=keep_rdev)

    @operation
    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        """Create a directory."""
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)

    @operation
    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> Attr:
        """Create a regular file and open it."""
        return self._make_open(parent, name, mode, caller)

    @operation
    def tmpfile(self, parent: int, mode: int, flags: int, caller: Caller) -> Attr:
        """Create and open a regular file with no name in directory `parent` (O_TMPFILE):
        owner, group and ACLs as if made there; freed at its last close unless `link` names
        it first."""
        return self._make_open(parent, None, mode, caller)

    def _make_open(self, parent: int, name: bytes | None, mode: int, caller: Caller) -> Attr:
        attr = self._make(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        self.opens[attr.ino] = self.opens.get(attr.ino, 0) + 1
        return attr

    @operation
    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        """Create a symbolic link to `target`."""
        if not target:
            raise FSError(errno.ENOENT, "empty symlink target")
        if len(target) >= os.pathconf("/", "PC_PATH_MAX"):
            raise FSError(errno.ENAMETOOLONG, f"symlink target of {len(target)} bytes")
        return self._make(parent, name, stat.S_IFLNK | 0o777, caller, target=target)

    @operation
    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        """Give inode `ino` another name; a file with no links can be named while it is open
        (the kernel allows that only for O_TMPFILE files opened without O_EXCL)."""
        check_name(name)
        self.check_metadata_room()
        r = self._row(ino)
        if stat.S_ISDIR(r[1]):
            raise FSError(errno.EPERM, "hard links to directories are not allowed")
        if r[2] == 0 and not self.opens.get(ino):
            raise FSError(errno.ENOENT, f"inode {ino} has been removed")
        if r[2] >= LINK_MAX:
            raise FSError(errno.EMLINK, f"inode {ino} has {r[2]} links already")
        self._live_dir(parent)
        if self._entry(parent, name) is not None:
            raise FSError(errno.EEXIST, f"{name!r} exists in directory {parent}")
        self.refuse_link(ino, parent)
        self.db.change("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                       (parent, name, ino))
        self.unlinked_held.pop(ino, None)  # named again (an O_TMPFILE file)
        now = now_ns()
        self._add_links(ino, 1)
        self._touch(ino, mtime=False, now=now)
        self._touch(parent, now=now)
        return self._attr(self._row(ino))
