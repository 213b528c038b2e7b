"""Filesystem methods for extended attributes (setxattr(2) and friends)."""

from __future__ import annotations

import errno

from vfs.errors import FSError
from vfs.ops import operation, query

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
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

        The kernel asks for it before every write to a FUSE file (FUSE inodes never get
        S_NOSEC); while this holds the answer, ENODATA, needs neither the lock nor the database.
        """
        return name == CAPABILITY_XATTR and not self.capabilities_seen

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name:
            raise FSError(errno.EINVAL, "empty attribute name")
        if len(name) > XATTR_NAME_MAX:
            raise FSError(errno.ERANGE, f"attribute name of {len(name)} bytes")
        if not name.startswith(XATTR_NAMESPACES):
            raise FSError(errno.EOPNOTSUPP, f"attribute namespace of {name!r} not supported")
        if name in XATTR_NAMESPACES:
            raise FSError(errno.EINVAL, f"attribute name {name!r} is only a namespace")

    @operation
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set an extended attribute (XATTR_CREATE / XATTR_REPLACE as setxattr(2))."""
        self._check_xattr_name(name)
        self._row(ino)
        if len(value) > XATTR_SIZE_MAX:
            raise FSError(errno.E2BIG, f"attribute value of {len(value)} bytes")
        if name == CAPABILITY_XATTR:
            self.capabilities_seen = True  # never back to False while mounted: conservative
        exists = self.db.row("SELECT 1 FROM xattrs WHERE inode=? AND name=?",
                             (ino, name)) is not None
        if flags & XATTR_CREATE and exists:
            raise FSError(errno.EEXIST, f"attribute {name!r} exists")
        if flags & XATTR_REPLACE and not exists:
            raise FSError(errno.ENODATA, f"no attribute {name!r}")
        self.db.change("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
                       (ino, name, value))
        self._touch(ino, mtime=False)

    @query
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of an extended attribute."""
        self._check_xattr_name(name)
        self._row(ino)
        v = self.db.value("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name))
        if v is None:
            raise FSError(errno.ENODATA, f"no attribute {name!r}")
        return bytes(v)

    @query
    def listxattr(self, ino: int) -> list[bytes]:
        """Names of an inode's extended attributes."""
        self._row(ino)
        return [bytes(r[0]) for r in self.db.rows(
            "SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,))]

    @operation
    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an extended attribute."""
        self._check_xattr_name(name)
        self._row(ino)
        if not self.db.change("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)):
            raise FSError(errno.ENODATA, f"no attribute {name!r}")
        self._touch(ino, mtime=False)
