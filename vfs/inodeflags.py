"""Inode flags as chattr(1) and lsattr(1) see them (FS_IOC_GETFLAGS and FS_IOC_SETFLAGS):
immutable, append-only, no-dump and no-atime, and the changes the first two refuse.

The kernel keeps no such flags for a FUSE inode, so its own checks never see them: every refusal
is made here, with the errno and in the order ext4 and the VFS give them. An immutable inode
cannot be written, truncated, renamed, removed, linked to, or have its mode, owner, times or
attributes changed, and nothing can be added to or removed from an immutable directory. An
append-only file can only be opened for writing with O_APPEND (so it grows at its end); an
append-only directory takes new names but gives none up. New inodes take no-dump and no-atime
from their directory. Who may set which flag (owner or
CAP_FOWNER; CAP_LINUX_IMMUTABLE for immutable and append-only) the kernel checks before the
request arrives.

The flags live in the table `inode_flags` (only inodes with some flag have a row); the inodes
that have any are also held in memory, so that the checks on every write and open cost a
dictionary lookup.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from vfs.attrs import SetAttr
from vfs.errors import FSError
from vfs.ops import now_ns, operation, query

if TYPE_CHECKING:
    from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

# FS_*_FL of linux/fs.h: the flags dwfs keeps.
IMMUTABLE = 0x10
APPEND = 0x20
NODUMP = 0x40
NOATIME = 0x80
SUPPORTED = IMMUTABLE | APPEND | NODUMP | NOATIME
FIXED = IMMUTABLE | APPEND  # flags that refuse changes
INHERITED = NODUMP | NOATIME  # flags a new inode takes from its directory, as on ext4

# FS_XFLAG_* of linux/fs.h (struct fsxattr, FS_IOC_FSGETXATTR): the same flags.
_XFLAGS = {IMMUTABLE: 0x08, APPEND: 0x10, NOATIME: 0x40, NODUMP: 0x80}

_NAMES = {IMMUTABLE: "immutable", APPEND: "append-only"}


def to_xflags(flags: int) -> int:
    """FS_XFLAG_* bits for FS_*_FL bits."""
    return sum(x for f, x in _XFLAGS.items() if flags & f)


def from_xflags(xflags: int) -> int:
    """FS_*_FL bits for FS_XFLAG_* bits; EOPNOTSUPP for an xflag dwfs does not keep."""
    unknown = xflags & ~sum(_XFLAGS.values())
    if unknown:
        raise FSError(errno.EOPNOTSUPP, f"file attribute flags {unknown:#x} are not supported")
    return sum(f for f, x in _XFLAGS.items() if xflags & x)


def load_flags(db: MetaDB) -> dict[int, int]:
    """The flags of every inode that has some (none in a database made before them and opened
    read-only, which cannot be given the table)."""
    if db.value("SELECT count(*) FROM sqlite_master WHERE name='inode_flags'", (), 0) == 0:
        return {}
    return {ino: flags for ino, flags in db.rows("SELECT inode, flags FROM inode_flags")}


class FlagOps:
    """Inode flags for Filesystem (a mixin: it uses the database, the lock and the inode
    helpers of Filesystem)."""

    db: MetaDB
    inode_flags: dict[int, int]

    @query
    def get_flags(self, ino: int) -> int:
        """The inode's FS_*_FL flags."""
        self._row(ino)  # type: ignore[attr-defined]
        return self.inode_flags.get(ino, 0)

    @operation
    def set_flags(self, ino: int, flags: int) -> None:
        """Set the inode's flags (EOPNOTSUPP for one dwfs does not keep); ctime changes. An
        inode that is and stays immutable keeps its other flags too (EPERM), as on ext4."""
        self._row(ino)  # type: ignore[attr-defined]
        if flags & ~SUPPORTED:
            raise FSError(errno.EOPNOTSUPP,
                          f"inode flags {flags & ~SUPPORTED:#x} are not supported")
        old = self.inode_flags.get(ino, 0)
        if old & flags & IMMUTABLE and old != flags:
            raise FSError(errno.EPERM, f"inode {ino} is immutable: clear that flag first")
        if flags:
            self.db.change("INSERT OR REPLACE INTO inode_flags (inode, flags) VALUES (?, ?)",
                           (ino, flags))
        else:
            self.db.change("DELETE FROM inode_flags WHERE inode=?", (ino,))
        self.db.change("UPDATE inodes SET ctime_ns=? WHERE id=?", (now_ns(), ino))
        # The savepoint undoes the rows if a later step fails; nothing here fails after this.
        if flags:
            self.inode_flags[ino] = flags
        else:
            self.inode_flags.pop(ino, None)
        if (old ^ flags) & FIXED:
            log.debug("inode %d: flags %#x -> %#x", ino, old, flags)

    def inherited_flags(self, parent: int) -> int:
        """The flags a new inode takes from its directory `parent` (no-dump, no-atime)."""
        return self.inode_flags.get(parent, 0) & INHERITED

    def inherit_flags(self, parent: int, ino: int) -> None:
        """Give new inode `ino` the inherited flags of its directory `parent`: the last step
        of making it, as an inode number freed by a rolled-back step is given out again."""
        flags = self.inherited_flags(parent)
        if flags:
            self.db.change("INSERT INTO inode_flags (inode, flags) VALUES (?, ?)", (ino, flags))
            self.inode_flags[ino] = flags

    def forget_flags(self, ino: int) -> None:
        """Drop a freed inode's flags from memory (its row goes with the inode's)."""
        self.inode_flags.pop(ino, None)

    # --- refusals -----------------------------------------------------------------------------

    def _refuse_if(self, ino: int, which: int, what: str) -> None:
        """EPERM if inode `ino` has one of the flags `which`."""
        flags = self.inode_flags.get(ino, 0) & which
        if flags:
            name = _NAMES[IMMUTABLE if flags & IMMUTABLE else APPEND]
            raise FSError(errno.EPERM, f"cannot {what}: inode {ino} is {name}")

    def refuse_removal(self, parent: int, ino: int) -> None:
        """A name of `ino` cannot leave directory `parent` (unlink, rmdir, either side of a
        rename) when either is immutable or append-only."""
        self._refuse_if(parent, FIXED, "remove or move a name from a directory")
        self._refuse_if(ino, FIXED, "remove or move it")

    def refuse_new_name(self, parent: int) -> None:
        """Nothing can be added to an immutable directory."""
        self._refuse_if(parent, IMMUTABLE, "add a name to a directory")

    def refuse_link(self, ino: int, parent: int) -> None:
        """A hard link needs a directory that takes names and a source that allows links."""
        self.refuse_new_name(parent)
        self._refuse_if(ino, FIXED, "link to it")

    def refuse_open(self, ino: int, flags: int) -> None:
        """An immutable file cannot be opened for writing or truncated; an append-only one
        only for appending (O_APPEND, without O_TRUNC)."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._refuse_if(ino, IMMUTABLE, "open it for writing")
            if not flags & os.O_APPEND or flags & os.O_TRUNC:
                self._refuse_if(ino, APPEND, "open it for writing other than appending")

    def refuse_write(self, ino: int) -> None:
        """Writing to an immutable file, through any descriptor. Append-only is checked when
        a file is opened (`refuse_open`), as the VFS does: a descriptor opened for writing
        before the flag was set writes anywhere, on ext4 too, and the kernel puts every
        O_APPEND write at the end."""
        self._refuse_if(ino, IMMUTABLE, "write to it")

    def refuse_setattr(self, ino: int, ch: SetAttr) -> None:
        """An immutable inode keeps every attribute; an append-only one its size, mode, owner
        and times (setting them to now is allowed, as `touch` does)."""
        self._refuse_if(ino, IMMUTABLE, "change its attributes")
        if (ch.size is not None or ch.mode is not None or ch.uid is not None
                or ch.gid is not None or ch.explicit_times):
            self._refuse_if(ino, APPEND, "change its size, mode, owner or times")

    def refuse_xattr_change(self, ino: int) -> None:
        """Extended attributes of an immutable or append-only inode stay as they are."""
        self._refuse_if(ino, FIXED, "change its extended attributes")

    def refuse_fallocate(self, ino: int, mode: int) -> None:
        """fallocate of an immutable file; punching or zeroing in an append-only one."""
        self._refuse_if(ino, IMMUTABLE, "allocate space in it")
        if mode & ~0x01:  # anything but FALLOC_FL_KEEP_SIZE
            self._refuse_if(ino, APPEND, "punch or zero a range in it")

    def fixed_flags(self, ino: int) -> int:
        """The immutable and append-only flags of `ino` (for changes made inside vfs, such as
        a ghost import's, which leave such inodes as they are)."""
        return self.inode_flags.get(ino, 0) & FIXED

    def no_atime(self, ino: int) -> bool:
        """True if reading `ino` must leave its atime (chattr +A)."""
        return bool(self.inode_flags.get(ino, 0) & NOATIME)
