"""Filesystem methods that move names: rename(2) and renameat2's NOREPLACE, EXCHANGE and
WHITEOUT."""

from __future__ import annotations

import errno
import stat

from vfs.attrs import ROOT_INODE, Caller, check_name
from vfs.errors import FSError
from vfs.ops import now_ns, operation

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


class RenameOps:
    """rename for Filesystem (a mixin: it uses the inode and name helpers of Filesystem)."""

    def _is_within(self, ino: int, ancestor: int) -> bool:
        """True if directory `ino` is `ancestor` or lies below it."""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INODE:
                return False
            ino = self._parent_of(ino)
            seen += 1
            if seen > 100000:
                raise FSError(errno.ELOOP, "directory tree has a cycle")

    @operation
    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0, caller: Caller | None = None) -> None:
        """Move a name, replacing or exchanging with what is at the destination; WHITEOUT
        leaves a whiteout (a character device 0/0 made by `caller`) at the old name, as
        overlayfs asks of its upper layer."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise FSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        if flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT):
            raise FSError(errno.EINVAL, f"RENAME_EXCHANGE with other flags ({flags:#x})")
        if flags & RENAME_WHITEOUT and caller is None:
            raise FSError(errno.EINVAL, "RENAME_WHITEOUT without the caller to own the whiteout")
        check_name(new_name)
        sid, sino, srow = self._existing(parent, name)
        self._live_dir(new_parent)
        dst = self._entry(new_parent, new_name)
        src_dir = stat.S_ISDIR(srow[1])
        now = now_ns()
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FSError(errno.ENOENT, f"{new_name!r} not in directory {new_parent}")
            self._exchange(parent, sid, sino, srow, new_parent, dst, now)
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise FSError(errno.EEXIST, f"{new_name!r} exists in directory {new_parent}")
        if dst is not None and dst[1] == sino:
            return  # two names of one inode: POSIX says do nothing
        if src_dir and self._is_within(new_parent, sino):
            raise FSError(errno.EINVAL, "cannot move a directory into itself")
        self.refuse_removal(parent, sino)
        if dst is None:
            self.refuse_new_name(new_parent)
        else:
            self.refuse_removal(new_parent, dst[1])
        if dst is not None:
            drow = self._row(dst[1])
            if stat.S_ISDIR(drow[1]):
                if not src_dir:
                    raise FSError(errno.EISDIR, f"{new_name!r} is a directory")
                if self._has_entries(dst[1]):
                    raise FSError(errno.ENOTEMPTY, f"directory {new_name!r} is not empty")
            elif src_dir:
                raise FSError(errno.ENOTDIR, f"{new_name!r} is not a directory")
            self._remove_entry(dst[0], new_parent, dst[1], drow)
        self.db.change("UPDATE dentries SET parent=?, name=? WHERE id=?",
                       (new_parent, new_name, sid))
        if src_dir and parent != new_parent:
            self._add_links(parent, -1)
            self._add_links(new_parent, 1)
        self._touch(sino, mtime=False, now=now)
        self._touch(parent, now=now)
        if new_parent != parent:
            self._touch(new_parent, now=now)
        if flags & RENAME_WHITEOUT:
            assert caller is not None
            self._make(parent, name, stat.S_IFCHR, caller, rdev=0)

    def _exchange(self, parent: int, sid: int, sino: int, srow: tuple, new_parent: int,
                  dst: tuple[int, int], now: int) -> None:
        did, dino = dst
        if dino == sino:
            return
        drow = self._row(dino)
        s_dir, d_dir = stat.S_ISDIR(srow[1]), stat.S_ISDIR(drow[1])
        if s_dir and self._is_within(new_parent, sino):
            raise FSError(errno.EINVAL, "cannot move a directory into itself")
        if d_dir and self._is_within(parent, dino):
            raise FSError(errno.EINVAL, "cannot move a directory into itself")
        self.refuse_removal(parent, sino)
        self.refuse_removal(new_parent, dino)
        self.db.change("UPDATE dentries SET inode=? WHERE id=?", (dino, sid))
        self.db.change("UPDATE dentries SET inode=? WHERE id=?", (sino, did))
        if parent != new_parent and s_dir != d_dir:
            moved_to_new = 1 if s_dir else -1
            self._add_links(new_parent, moved_to_new)
            self._add_links(parent, -moved_to_new)
        for ino in (sino, dino):
            self._touch(ino, mtime=False, now=now)
        self._touch(parent, now=now)
        if new_parent != parent:
            self._touch(new_parent, now=now)
