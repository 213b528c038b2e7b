"""Filesystem methods for extended attributes (setxattr(2) and friends)."""

from __future__ import annotations

import errno
import stat

from vfs import acl
from vfs.attrs import Caller
from vfs.errors import FSError
from vfs.ops import operation, query

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536  # the most listxattr(2) returns
LIST_RESERVE = 64  # room in the list for names the view adds (user.dwfs.state, .query)
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
CAPABILITY_XATTR = b"security.capability"


class XattrOps:
    """Extended attributes for Filesystem (a mixin: it uses the inode helpers of
    Filesystem)."""

    capabilities_seen = True  # may any file have CAPABILITY_XATTR? (looked up at mount)

    def _look_for_capabilities(self) -> None:
        self.capabilities_seen = self.db.row(
            "SELECT 1 FROM xattrs WHERE name=? LIMIT 1", (CAPABILITY_XATTR,)) is not None

    def has_no_capability(self, name: bytes) -> bool:
        """True when `name` is security.capability and no file has that attribute.

        The kernel asks for it before writes to a FUSE file it has not yet marked S_NOSEC;
        while this holds the answer, ENODATA, needs neither the lock nor the database.
        """
        return name == CAPABILITY_XATTR and not self.capabilities_seen

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name:
            raise FSError(errno.EINVAL, "empty attribute name")
        if len(name) > XATTR_NAME_MAX:
            raise FSError(errno.ERANGE, f"attribute name of {len(name)} bytes")
        if not name.startswith(XATTR_NAMESPACES) and name not in acl.NAMES:
            raise FSError(errno.EOPNOTSUPP, f"attribute namespace of {name!r} not supported")
        if name in XATTR_NAMESPACES:
            raise FSError(errno.EINVAL, f"attribute name {name!r} is only a namespace")

    @operation
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0,
                 who: Caller | None = None) -> None:
        """Set an extended attribute (XATTR_CREATE / XATTR_REPLACE as setxattr(2)); `who`
        sets it (an access control list set by an outsider to the file's group clears
        setgid)."""
        self._check_xattr_name(name)
        self.check_metadata_room()
        r = self._row(ino)
        self.refuse_xattr_change(ino)
        if len(value) > XATTR_SIZE_MAX:
            raise FSError(errno.E2BIG, f"attribute value of {len(value)} bytes")
        exists = self.db.row("SELECT 1 FROM xattrs WHERE inode=? AND name=?",
                             (ino, name)) is not None
        if not exists:
            self._check_list_room(ino, name)
        if name == CAPABILITY_XATTR:
            self.capabilities_seen = True  # never back to False while mounted: conservative
        if name in acl.NAMES:
            self._set_acl(r, name, value, who)
            return
        if flags & XATTR_CREATE and exists:
            raise FSError(errno.EEXIST, f"attribute {name!r} exists")
        if flags & XATTR_REPLACE and not exists:
            raise FSError(errno.ENODATA, f"no attribute {name!r}")
        self._put_xattr(ino, name, value)
        self._touch(ino, mtime=False)

    def _check_list_room(self, ino: int, name: bytes) -> None:
        """ENOSPC if one more name would make the inode's list of attribute names longer than
        listxattr(2) can return (then no tool could copy or show them; ext4 says ENOSPC when
        its attribute space is full)."""
        used = self.db.value("SELECT coalesce(sum(length(name) + 1), 0) FROM xattrs "
                             "WHERE inode=?", (ino,))
        if used + len(name) + 1 > XATTR_LIST_MAX - LIST_RESERVE:
            raise FSError(errno.ENOSPC, f"inode {ino}: the names of its attributes would pass "
                                        f"{XATTR_LIST_MAX - LIST_RESERVE} bytes")

    def _set_acl(self, r: tuple, name: bytes, value: bytes, who: Caller | None) -> None:
        """Set an access control list on the inode of row `r`: an access list sets the mode's
        permission bits (and is not kept when they say it all); a default list only on a
        directory."""
        entries = acl.parse(value)
        ino = r[0]
        if name == acl.DEFAULT:
            if not stat.S_ISDIR(r[1]):
                raise FSError(errno.EACCES, f"inode {ino}: a default list needs a directory")
            self._put_xattr(ino, name, acl.pack(entries))
        else:
            mode = (r[1] & ~acl.PERMS) | acl.mode_bits(entries)
            if who is not None and who.uid != 0 and not who.in_group(r[4]):
                mode &= ~stat.S_ISGID  # as the kernel's posix_acl_update_mode
            if acl.is_minimal(entries):
                self.db.change("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name))
            else:
                self._put_xattr(ino, name, acl.pack(entries))
            self.db.change("UPDATE inodes SET mode=? WHERE id=?", (mode, ino))
        self._touch(ino, mtime=False)

    def _put_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._put_xattrs(ino, [(name, value)])

    def _put_xattrs(self, ino: int, items: list[tuple[bytes, bytes]]) -> None:
        for name, value in items:
            self.db.change("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
                           (ino, name, value))

    def _xattr(self, ino: int, name: bytes) -> bytes | None:
        v = self.db.value("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name))
        return None if v is None else bytes(v)

    def _acl_follows_mode(self, ino: int, mode: int) -> None:
        """chmod: an access list takes the new permission bits."""
        v = self._xattr(ino, acl.ACCESS)
        if v is not None:
            self._put_xattr(ino, acl.ACCESS, acl.pack(acl.with_mode(acl.parse(v), mode)))

    def _acl_for_new(self, parent: int, mode: int, umask: int | None
                     ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The mode and access control lists of a new file in directory `parent`: its default
        list when it has one (a directory inherits it as its own default too), else the mode
        less the creator's umask (`umask` None: the kernel has applied it)."""
        if stat.S_ISLNK(mode):
            return mode, []
        v = self._xattr(parent, acl.DEFAULT)
        if v is None:
            return (mode if umask is None else mode & ~umask), []
        entries, mode = acl.inherited(acl.parse(v), mode)
        lists = [] if acl.is_minimal(entries) else [(acl.ACCESS, acl.pack(entries))]
        if stat.S_ISDIR(mode):
            lists.append((acl.DEFAULT, v))
        return mode, lists

    @query
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of an extended attribute."""
        self._check_xattr_name(name)
        self._row(ino)
        v = self._xattr(ino, name)
        if v is None:
            raise FSError(errno.ENODATA, f"no attribute {name!r}")
        return v

    @query
    def listxattr(self, ino: int) -> list[bytes]:
        """Names of an inode's extended attributes."""
        self._row(ino)
        return [bytes(r[0]) for r in self.db.rows(
            "SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,))]

    @operation
    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an extended attribute (an access control list that is not there is removed
        without complaint, as on ext4)."""
        self._check_xattr_name(name)
        self._row(ino)
        self.refuse_xattr_change(ino)
        if not self.db.change("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)):
            if name in acl.NAMES:
                return
            raise FSError(errno.ENODATA, f"no attribute {name!r}")
        self._touch(ino, mtime=False)
