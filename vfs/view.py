"""The tree users see: the filesystem plus smart folders and the directories shown in them.

A directory that matches a smart folder's query is shown there as a *mirror*: a directory with
its own inode number (the real one with `MIRROR_BIT` set) whose contents are the real
directory's, files under their own inode numbers and subdirectories as mirrors again. The kernel
must never see one directory inode under two parents (it would move or refuse the dentry), so
mirrors keep the two apart; files may have many names and are shown as themselves, so reading
and writing through a smart folder reads and writes the original.

Names cannot be created, removed or moved inside a smart folder or a mirror (EPERM): a listing
there is the result of a query, not a place. A smart folder seen through a mirror is shown
empty, so no listing can recurse into itself.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from vfs.attrs import ROOT_INODE, Attr, Caller, DirEntry, SetAttr
from vfs.copyrange import copy_range
from vfs.errors import FSError
from vfs.fs import JOINED_COLUMNS, Filesystem
from vfs.ghostimport import ImportReport, import_tree, sync_changes
from vfs.ghosts import Ghosts
from vfs.smart import SmartFolders
from vfs.xattrnames import QUERY_XATTR, STATE_XATTR

MIRROR_BIT = 1 << 48


def real_inode(ino: int) -> int:
    """The stored inode behind a (possibly mirrored) inode number."""
    return ino & ~MIRROR_BIT


class View:
    """The POSIX object the FUSE adapter serves: a Filesystem with smart folders and ghosts."""

    def __init__(self, fs: Filesystem, ghost_cache_limit: int | None = None) -> None:
        self.fs = fs
        self.lock = fs.lock
        self.smart = SmartFolders(fs.db, JOINED_COLUMNS, fs.resolve_dir)
        self.ghosts = Ghosts(fs, ghost_cache_limit)
        fs.freed_hooks += [self.smart.forget, self.ghosts.forget]
        self._listings: dict[int, list[DirEntry]] = {}  # by directory handle
        self._open_dirs: dict[int, int] = {}  # directory handle -> inode shown
        self._handles = 0

    # --- helpers ------------------------------------------------------------------------------

    def volatile(self, parent: int) -> bool:
        """True if names in directory `parent` come from a query (the kernel must not cache
        them)."""
        return parent & MIRROR_BIT != 0 or self.smart.is_smart(parent)

    def keeps_names(self, parent: int) -> bool:
        """True if a name missing from directory `parent` stays missing until a change the
        kernel sees: not in a smart folder or mirror, nor in an empty directory (which
        setting a query can turn into a smart folder)."""
        return not self.volatile(parent) and self.fs.has_entries(real_inode(parent))

    def volatile_handle(self, handle: int) -> bool:
        """True if the directory open as `handle` lists names from a query."""
        ino = self._open_dirs.get(handle)
        return ino is not None and self.volatile(ino)

    def _shown(self, attr: Attr, mirrored: bool) -> Attr:
        """`attr` as shown at a place: directories reached through a query are mirrors."""
        if mirrored and stat.S_ISDIR(attr.mode) and attr.ino != ROOT_INODE:
            return dataclasses.replace(attr, ino=attr.ino | MIRROR_BIT)
        return attr

    def _fixed(self, parent: int, what: str) -> None:
        """Refuse a change of names inside a smart folder or a mirror."""
        if self.volatile(parent):
            kind = "a smart folder" if self.smart.is_smart(parent) else "a smart folder's view"
            raise FSError(errno.EPERM,
                          f"cannot {what} in {kind} (inode {parent}); change the original")

    # --- lookups and attributes ---------------------------------------------------------------

    def find(self, parent: int, name: bytes) -> Attr | None:
        """The attributes of `name` in directory `parent`, or None."""
        with self.lock:
            real = real_inode(parent)
            mirrored = real != parent
            if name in (b".", b".."):
                attr = self.fs.find(real, name)
                return None if attr is None else self._shown(attr, mirrored)
            if self.smart.is_smart(real):
                if mirrored:
                    return None  # a smart folder seen through a mirror is empty
                self.fs.find(real, b".")  # ENOENT/ENOTDIR as for any directory
                row = self.smart.lookup(real, name)
                return None if row is None else self._shown(self.fs.row_attr(row), True)
            attr = self.fs.find(real, name)
            return None if attr is None else self._shown(attr, mirrored)

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Like `find`, but ENOENT when the name does not exist."""
        attr = self.find(parent, name)
        if attr is None:
            raise FSError(errno.ENOENT, f"{name!r} not in directory {parent}")
        return attr

    def getattr(self, ino: int) -> Attr:
        """The attributes of an inode (mirrors show their directory's)."""
        return self._shown(self.fs.getattr(real_inode(ino)), ino & MIRROR_BIT != 0)

    def statx(self, ino: int) -> tuple[Attr, int | None]:
        """The attributes of an inode and when it was made (None: made before dwfs kept birth
        times); a mirror shows its directory's."""
        return self.getattr(ino), self.fs.birth_time(real_inode(ino))

    def setattr(self, ino: int, ch: SetAttr) -> Attr:
        """Change attributes; through a mirror, of the real directory. Truncating a ghost
        makes it an ordinary file (fetched first, unless truncated to zero)."""
        if ch.size is not None and self.ghosts.state(ino) is not None:
            self.fs.refuse_setattr(ino, ch)  # before the ghost changes
            if ch.size:
                self.ghosts.make_ordinary(ino)  # waits for the fetch: not under the lock
            with self.lock:
                self.ghosts.make_ordinary(ino, keep_content=False)  # (if still a ghost)
                return self.fs.setattr(ino, ch)
        return self._shown(self.fs.setattr(real_inode(ino), ch), ino & MIRROR_BIT != 0)

    def remember(self, attr: Attr) -> None:
        """The kernel was given an entry for `attr` (it keeps the inode alive until it
        forgets it)."""
        self.fs.remember(real_inode(attr.ino))

    def drop_refs(self, items: list[tuple[int, int]]) -> list[int]:
        """The kernel dropped references: (inode, count) pairs, counted without the lock.
        Returns the removed inodes it let go of, for `free_forgotten`."""
        return self.fs.drop_refs([(real_inode(ino), count) for ino, count in items])

    def free_forgotten(self, inos: list[int]) -> None:
        """Free removed inodes that `drop_refs` returned (under the lock)."""
        self.fs.free_forgotten(inos)

    def readlink(self, ino: int) -> bytes:
        """The target of a symbolic link."""
        return self.fs.readlink(ino)

    # --- creating and removing names ----------------------------------------------------------

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        """Create a file, FIFO, socket or device node."""
        with self.lock:
            self._fixed(parent, "create a file")
            return self.fs.mknod(parent, name, mode, rdev, caller)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        """Create a directory."""
        with self.lock:
            self._fixed(parent, "create a directory")
            return self.fs.mkdir(parent, name, mode, caller)

    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> Attr:
        """Create and open a regular file."""
        with self.lock:
            self._fixed(parent, "create a file")
            return self.fs.create(parent, name, mode, flags, caller)

    def tmpfile(self, parent: int, mode: int, flags: int, caller: Caller) -> Attr:
        """Create and open a regular file with no name (O_TMPFILE)."""
        with self.lock:
            self._fixed(parent, "create a file")
            return self.fs.tmpfile(parent, mode, flags, caller)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        """Create a symbolic link."""
        with self.lock:
            self._fixed(parent, "create a symbolic link")
            return self.fs.symlink(parent, name, target, caller)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        """Give a file another name."""
        with self.lock:
            self._fixed(parent, "create a link")
            if ino & MIRROR_BIT:
                raise FSError(errno.EPERM, "hard links to directories are not allowed")
            return self.fs.link(ino, parent, name)

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a name."""
        with self.lock:
            self._fixed(parent, "remove a name")
            self.fs.unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory (a smart folder is empty: it can be removed)."""
        with self.lock:
            self._fixed(parent, "remove a directory")
            self.fs.rmdir(parent, name)  # a freed smart folder is forgotten by freed_hooks

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0, caller: Caller | None = None) -> None:
        """Move a name (not into, out of or within a smart folder)."""
        with self.lock:
            self._fixed(parent, "move a name")
            self._fixed(new_parent, "move a name")
            self.fs.rename(parent, name, new_parent, new_name, flags, caller)

    # --- files --------------------------------------------------------------------------------

    def open(self, ino: int, flags: int, kill_setid: bool = False) -> Attr:
        """Open a file; O_TRUNC makes a ghost an ordinary empty file without fetching it
        (`kill_setid`: see Filesystem.open)."""
        with self.lock:
            if flags & os.O_TRUNC and self.ghosts.state(ino) is not None:
                self.fs.refuse_open(ino, flags)  # before the ghost changes
                self.ghosts.make_ordinary(ino, keep_content=False)
            return self.fs.open(ino, flags, kill_setid)

    def atime_due(self, attr: Attr) -> bool:
        """True if reading the file or directory `attr` now would update its atime."""
        return self.fs.atime_due(attr)

    def release(self, ino: int) -> None:
        """Close a file."""
        self.fs.release(ino)

    def needs_fetch(self, ino: int) -> bool:
        """True if reading or writing `ino` may wait for a ghost's source (the adapter runs
        such calls in their own thread)."""
        return self.ghosts.needs_fetch(ino)

    def is_ghost(self, ino: int) -> bool:
        """True if `ino` is a ghost in any state."""
        return self.ghosts.state(ino) is not None

    def read_held(self, ino: int, offset: int, length: int) -> bytes | None:
        """A ghost's range if its fetch has it in memory now (never waits); else None."""
        return self.ghosts.read_held(ino, offset, length)

    def read(self, ino: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Read file data; a ghost's is fetched as far as the range needs."""
        return self.ghosts.read(ino, offset, length)

    def write(self, ino: int, offset: int, data: bytes | memoryview,
              kill_setid: bool = False) -> int:
        """Write file data; a ghost is fetched first and becomes an ordinary file
        (`kill_setid`: see Filesystem.write)."""
        if self.ghosts.state(ino) is not None:
            self.fs.refuse_write(ino)  # before it changes
            self.ghosts.make_ordinary(ino)
        return self.fs.write(ino, offset, data, kill_setid=kill_setid)

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a file; a ghost is fetched first and becomes an ordinary file."""
        if self.ghosts.state(ino) is not None:
            self.fs.refuse_fallocate(ino, mode)  # before it changes
            self.ghosts.make_ordinary(ino)
        self.fs.fallocate(ino, mode, offset, length)

    def copy_range(self, src: int, off_in: int, dst: int, off_out: int, length: int) -> int:
        """copy_file_range(2) from file `src` to file `dst`; returns the bytes copied."""
        return copy_range(self, src, off_in, dst, off_out, length)

    def get_flags(self, ino: int) -> int:
        """chattr's flags of an inode (FS_IOC_GETFLAGS); through a mirror, of the directory."""
        return self.fs.get_flags(real_inode(ino))

    def set_flags(self, ino: int, flags: int) -> None:
        """Set chattr's flags of an inode (FS_IOC_SETFLAGS)."""
        self.fs.set_flags(real_inode(ino), flags)

    def seek(self, ino: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE. A ghost not yet stored is data throughout (its holes are
        not known here), as a filesystem that cannot tell answers."""
        return self.fs.seek(ino, offset, whence, all_data=self.ghosts.needs_fetch(ino))

    # --- directories --------------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        """Open a directory for listing; returns the handle to list and close it with."""
        with self.lock:
            self.fs.opendir(real_inode(ino))
            self._handles += 1
            self._open_dirs[self._handles] = ino
            return self._handles

    def releasedir(self, handle: int) -> None:
        """Close a directory handle."""
        with self.lock:
            ino = self._open_dirs.pop(handle)
            self._listings.pop(handle, None)
            self.fs.releasedir(real_inode(ino))

    def readdir(self, handle: int, cookie: int, limit: int = 256) -> list[DirEntry]:
        """Entries after `cookie`; a smart folder's are its query's result when the listing
        started (cookie 0)."""
        with self.lock:
            ino = self._open_dirs.get(handle)
            if ino is None:
                raise FSError(errno.EBADF, f"no open directory handle {handle}")
            real = real_inode(ino)
            mirrored = real != ino
            if not self.smart.is_smart(real):
                batch = self.fs.readdir(real, cookie, limit)
                if not mirrored:
                    return batch
                return [DirEntry(e.name, self._shown(e.attr, e.name != b".."), e.next_cookie)
                        for e in batch]
            if cookie == 0:
                head = self.fs.readdir(real, 0, 2)  # '.' and '..'
                entries = [] if mirrored else [
                    DirEntry(m.name, self._shown(self.fs.row_attr(m.row), True), i + 3)
                    for i, m in enumerate(self.smart.listing(real))]
                dots = [DirEntry(e.name, self._shown(e.attr, mirrored and e.name == b"."),
                                 e.next_cookie) for e in head]
                self._listings[handle] = dots + entries
            listing = self._listings.get(handle, [])
            return listing[cookie:cookie + limit]

    # --- extended attributes ------------------------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0,
                 who: Caller | None = None) -> None:
        """Set an attribute; `user.dwfs.query` on an empty directory makes a smart folder.
        `who` sets it (for the setgid rule of access control lists)."""
        real = real_inode(ino)
        if name == STATE_XATTR:
            self.fs.getattr(real)
            self.ghosts.set_state(real, value)
            return
        with self.lock:
            if name != QUERY_XATTR:
                self.fs.setxattr(real, name, value, flags, who)
                return
            query = self.smart.parse(value)
            attr = self.fs.getattr(real)
            self.smart.define(real, attr.mode, self.fs.has_entries(real), query)
            try:
                self.fs.setxattr(real, name, value, flags)
            except FSError:
                self.smart.forget(real)
                raise

    def has_no_capability(self, name: bytes) -> bool:
        """See Filesystem.has_no_capability (lock-free)."""
        return self.fs.has_no_capability(name)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of an attribute; `user.dwfs.state` is a ghost's state."""
        real = real_inode(ino)
        if name == STATE_XATTR:
            with self.lock:
                self.fs.getattr(real)
                state = self.ghosts.state(real)
                if state is None:
                    raise FSError(errno.ENODATA, f"inode {real} is not a ghost")
                return state.encode()
        return self.fs.getxattr(real, name)

    def listxattr(self, ino: int) -> list[bytes]:
        """Names of an inode's attributes (with `user.dwfs.state` for a ghost)."""
        real = real_inode(ino)
        with self.lock:
            names = self.fs.listxattr(real)
            if self.ghosts.state(real) is not None:
                names.append(STATE_XATTR)
            return names

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an attribute; removing `user.dwfs.query` makes a plain empty directory."""
        real = real_inode(ino)
        if name == STATE_XATTR:
            with self.lock:
                self.fs.getattr(real)
                if self.ghosts.state(real) is None:
                    raise FSError(errno.ENODATA, f"inode {real} is not a ghost")
            raise FSError(errno.EPERM, "a ghost's state can be changed, not removed")
        with self.lock:
            self.fs.removexattr(real, name)
            if name == QUERY_XATTR:
                self.smart.forget(real)

    def smart_folders(self) -> list[dict]:
        """Every smart folder: its path, query and current number of entries."""
        with self.lock:
            out = []
            for ino in sorted(self.smart.queries):
                path = self.fs.path_of(ino)
                if path is not None:
                    out.append({"path": path, "query": self.smart.queries[ino].text,
                                "entries": len(self.smart.listing(ino))})
            return out

    # --- ghosts -------------------------------------------------------------------------------

    def import_ghosts(self, dest: int, source: str, caller: Caller,
                      progress=None) -> ImportReport:
        """Ghosts under directory `dest` for every file under host directory `source`."""
        return import_tree(self.fs, self.ghosts, self._import_dest(dest), source, caller,
                           progress)

    def sync_ghosts(self, dest: int, source: str, caller: Caller,
                    changes: list[list[str]]) -> ImportReport:
        """Apply changes a watcher saw in `source` to its ghosts under `dest`."""
        return sync_changes(self.fs, self.ghosts, self._import_dest(dest), source, caller,
                            changes)

    def _import_dest(self, dest: int) -> int:
        """The directory an import fills: not a smart folder or its view (EPERM), nor an
        immutable directory (EPERM)."""
        self._fixed(dest, "import")
        self.fs.refuse_new_name(real_inode(dest))
        return real_inode(dest)

    # --- whole filesystem ---------------------------------------------------------------------

    def statfs(self) -> dict[str, int]:
        """Sizes for statfs(2)."""
        return self.fs.statfs()

    def commit(self, head_start: bool = False, log: bool = False) -> None:
        """Make every change durable (see Filesystem.commit)."""
        self.fs.commit(head_start, log)

    def small_commit(self) -> bool:
        """See Filesystem.small_commit (lock-free)."""
        return self.fs.small_commit()

    def needs_commit(self) -> bool:
        """True if there are changes not yet durable."""
        return self.fs.needs_commit()

    def close(self) -> None:
        """Stop fetches, commit and stop."""
        self.ghosts.close()
        self.fs.close()
