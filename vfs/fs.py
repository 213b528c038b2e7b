"""The POSIX filesystem over a redundant volume: inodes, names, contents, links, xattrs.

Every public method takes inode numbers, is safe to call from several threads (one lock), and
raises FSError with the errno POSIX and Linux prescribe. The kernel checks permissions (bits and
ACLs); this class does what it leaves to the filesystem: name rules, rename and rmdir rules,
setgid and ACL inheritance, times and link counts.

Metadata changes are collected in one open SQLite transaction. `commit` makes them durable
after the file data they point to: dirty blocks are written out, the volume is flushed, then the
transaction commits (like ext4's data=ordered).
"""

from __future__ import annotations

import errno
import logging
import stat
import threading
from collections.abc import Callable
from typing import Any

from vfs.alloc import SECTOR, Allocator
from vfs.attrs import (
    NAME_MAX,
    ROOT_INODE,
    Attr,
    DirEntry,
    SetAttr,
    check_name,
    without_setid,
)
from vfs.content import ContentOps
from vfs.errors import FSError
from vfs.filedata import BLOCK, SECTORS_PER_BLOCK, FileData, VolumeLike
from vfs.freespace import RESERVED_SECTORS, FreeSpace, used_sectors
from vfs.inodeflags import FlagOps, load_flags
from vfs.intentlog import IntentLog
from vfs.making import MakeOps
from vfs.metacopy import copy_reserve
from vfs.metadb import MetaDB
from vfs.ops import Runs, T, now_ns, operation, query
from vfs.rename import RENAME_EXCHANGE, RENAME_NOREPLACE, RenameOps
from vfs.xattrs import XATTR_CREATE, XATTR_REPLACE, XattrOps

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "XATTR_CREATE", "XATTR_REPLACE", "Filesystem",
           "JOINED_COLUMNS", "RESERVED_SECTORS", "check_name"]

log = logging.getLogger(__name__)

DIR_SIZE = 4096
RELATIME_SECONDS = 24 * 3600

_INODE_COLS = "id, mode, nlink, uid, gid, size, rdev, atime_ns, mtime_ns, ctime_ns, sectors"
JOINED_COLUMNS = ", ".join("i." + c.strip() for c in _INODE_COLS.split(","))
_ROW_SQL = f"SELECT {_INODE_COLS} FROM inodes WHERE id=?"
# A subquery, not a join: SQLite answers this one in about 5 µs, the join in 25.
_FIND_SQL = (f"SELECT {_INODE_COLS} FROM inodes WHERE id = "
             "(SELECT inode FROM dentries WHERE parent=? AND name=?)")


class Filesystem(Runs, ContentOps, MakeOps, RenameOps, XattrOps, FlagOps):
    """A mounted dwfs filesystem: metadata database + file contents on the volume."""

    def __init__(self, db: MetaDB, volume: VolumeLike) -> None:
        self.db = db
        self.volume = volume = IntentLog.opened(volume, db, write=not db.read_only)
        self.lock = threading.RLock()
        self._depth = 0
        self._closed = False
        total = volume.capacity // SECTOR
        self.alloc = Allocator(total, used_sectors(db), run=SECTORS_PER_BLOCK)
        # The superblocks are rewritten in place; new data keeps out of their stripe, so that
        # a crash in the middle of that write while degraded can tear nothing but them.
        sb = volume.stripe_bytes
        self.alloc.keep_out_below(-(-RESERVED_SECTORS * SECTOR // sb) * sb // SECTOR)
        self.alloc.guard = self._parity_only_sectors
        self.data = FileData(db, volume, self.alloc)
        self.copy_reserve = copy_reserve(db)  # sectors file data leaves for the next copy
        self.opens: dict[int, int] = {}
        self.kernel_refs: dict[int, int] = {}  # inode -> references the kernel holds
        # Inodes without names that are open or that the kernel holds (-> stored sectors),
        # and those the kernel let go of without any stored data, freed in batches.
        self.unlinked_held: dict[int, int] = {}
        self.free_later: list[int] = []
        self._refs_cond = threading.Condition(threading.Lock())  # guards kernel_refs
        self.inode_flags = load_flags(db)  # chattr's flags of the inodes that have some
        # Told of every inode freed.
        self.freed_hooks: list[Callable[[int], None]] = [self.forget_flags]
        self.noatime = False  # the mount's noatime: reads never update atime
        self.nodiratime = False  # the mount's nodiratime: listings never update atime
        self._look_for_capabilities()
        if not db.read_only:
            self._free_orphans()  # a read-only mount leaves them for the next read-write one

    @classmethod
    def format(cls, db: MetaDB, uid: int, gid: int, mode: int = 0o755) -> None:
        """Write the root directory of a new, empty filesystem."""
        now = now_ns()
        db.change(
            "INSERT INTO inodes (id, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, "
            "btime_ns) VALUES (?, ?, 2, ?, ?, 0, ?, ?, ?, ?)",
            (ROOT_INODE, stat.S_IFDIR | mode, uid, gid, now, now, now, now))
        db.set_setting("block_size", BLOCK)
        db.commit()

    def _free_orphans(self) -> None:
        """Free inodes left without names by a crash while they were open."""
        with self.lock:
            orphans = [r[0] for r in self.db.rows("SELECT id FROM inodes WHERE nlink=0")]
            for ino in orphans:
                log.info("inode %d: freeing it, unlinked while open before a crash", ino)
                self._free_inode(ino)
            if orphans:
                self.commit()

    # --- inode records ------------------------------------------------------------------------

    def _row(self, ino: int) -> tuple:
        r = self.db.row(_ROW_SQL, (ino,))
        if r is None:
            raise FSError(errno.ENOENT, f"no inode {ino}")
        return r

    def _attr(self, r: tuple) -> Attr:
        ino, mode, nlink, uid, gid, size, rdev, atime, mtime, ctime, sectors = r[:11]
        if stat.S_ISDIR(mode):
            size = DIR_SIZE
        if ino in self.data.dirty:
            sectors += self.data.dirty_sectors(ino)
        return Attr(ino, mode, nlink, uid, gid, size, rdev, atime, mtime, ctime,
                    sectors * (SECTOR // 512), BLOCK)

    def row_attr(self, row: tuple) -> Attr:
        """The attributes of an inode row selected with JOINED_COLUMNS."""
        return self._attr(row)

    @query
    def exists(self, ino: int) -> bool:
        """True if inode `ino` is stored (linked, or unlinked but still open)."""
        return self.db.row("SELECT 1 FROM inodes WHERE id=?", (ino,)) is not None

    @query
    def listdir(self, ino: int) -> list[bytes]:
        """The names in directory `ino`."""
        return [bytes(r[0]) for r in self.db.rows(
            "SELECT name FROM dentries WHERE parent=? ORDER BY id", (ino,))]

    @query
    def has_entries(self, ino: int) -> bool:
        """True if directory `ino` has any entries."""
        return self._has_entries(ino)

    @query
    def resolve_dir(self, path: str) -> int | None:
        """The inode of the directory at `path` (from the root, '/'-separated), or None."""
        ino = ROOT_INODE
        for part in path.encode().split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                ino = self._parent_of(ino)
                continue
            r = self.db.row("SELECT d.inode, i.mode FROM dentries d JOIN inodes i "
                            "ON i.id = d.inode WHERE d.parent=? AND d.name=?", (ino, part))
            if r is None or not stat.S_ISDIR(r[1]):
                return None
            ino = r[0]
        return ino

    @query
    def path_of(self, ino: int) -> str | None:
        """One path of inode `ino` from the root, or None if it has no name."""
        parts: list[bytes] = []
        while ino != ROOT_INODE:
            r = self.db.row("SELECT parent, name FROM dentries WHERE inode=? LIMIT 1", (ino,))
            if r is None or len(parts) > 10000:
                return None
            parts.append(bytes(r[1]))
            ino = r[0]
        return "/" + b"/".join(reversed(parts)).decode(errors="surrogateescape")

    def _dir_row(self, ino: int) -> tuple:
        r = self._row(ino)
        if not stat.S_ISDIR(r[1]):
            raise FSError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return r

    def _live_dir(self, ino: int) -> tuple:
        """A directory that can still get entries (not removed)."""
        r = self._dir_row(ino)
        if r[2] == 0:
            raise FSError(errno.ENOENT, f"directory inode {ino} has been removed")
        return r

    def _entry(self, parent: int, name: bytes) -> tuple[int, int] | None:
        """(dentry id, inode) of a name in a directory, or None."""
        return self.db.row("SELECT id, inode FROM dentries WHERE parent=? AND name=?",
                           (parent, name))

    def _parent_of(self, ino: int) -> int:
        if ino == ROOT_INODE:
            return ROOT_INODE
        p = self.db.value("SELECT parent FROM dentries WHERE inode=? LIMIT 1", (ino,))
        if p is None:
            raise FSError(errno.ENOENT, f"inode {ino} has no parent")
        return p

    def _touch(self, ino: int, mtime: bool = True, now: int | None = None) -> None:
        now = now or now_ns()
        if mtime:
            self.db.change("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, ino))
        else:
            self.db.change("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, ino))

    def _add_links(self, ino: int, delta: int) -> None:
        self.db.change("UPDATE inodes SET nlink=nlink+? WHERE id=?", (delta, ino))

    def _free_inode(self, ino: int, sectors: int | None = None) -> None:
        self.data.drop(ino, stored=sectors != 0)
        self.db.change("DELETE FROM inodes WHERE id=?", (ino,))  # trigger inodes_gone: the rest
        self.unlinked_held.pop(ino, None)
        for hook in self.freed_hooks:
            hook(ino)

    def _maybe_free(self, ino: int) -> None:
        r = self.db.row("SELECT nlink, sectors FROM inodes WHERE id=?", (ino,))
        if r is None or r[0] != 0:
            return
        if not self._hold_unlinked(ino, r[1]):
            self._free_inode(ino, r[1])

    def _hold_unlinked(self, ino: int, sectors: int) -> bool:
        """Keep unlinked inode `ino` (holding `sectors`) if it is open or the kernel holds it,
        to be freed by the last release or forget; false if nothing holds it."""
        with self._refs_cond:  # a forget arriving now sees it held (drop_refs)
            if not (self.opens.get(ino) or self.kernel_refs.get(ino)):
                return False
            self.unlinked_held[ino] = sectors
            return True

    # --- lookups and attributes ---------------------------------------------------------------

    @query
    def lookup(self, parent: int, name: bytes) -> Attr:
        """The attributes of `name` in directory `parent`."""
        attr = self.find(parent, name)
        if attr is None:
            raise FSError(errno.ENOENT, f"{name!r} not in directory {parent}")
        return attr

    @query
    def find(self, parent: int, name: bytes) -> Attr | None:
        """Like `lookup`, but None when the name does not exist."""
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        if name == b".":
            return self._attr(self._dir_row(parent))
        if name == b"..":
            self._dir_row(parent)
            return self._attr(self._row(self._parent_of(parent)))
        r = self.db.row(_FIND_SQL, (parent, name))
        if r is not None:
            return self._attr(r)
        self._dir_row(parent)  # ENOENT or ENOTDIR for the parent itself
        return None

    @query
    def getattr(self, ino: int) -> Attr:
        """The attributes of an inode."""
        return self._attr(self._row(ino))

    def birth_time(self, ino: int) -> int | None:
        """When an inode was made, in nanoseconds; None for an inode made before dwfs kept
        birth times. ENOENT for an inode that does not exist."""
        if not self.db.has_btime:
            self._row(ino)
            return None
        r = self.db.row("SELECT btime_ns FROM inodes WHERE id=?", (ino,))
        if r is None:
            raise FSError(errno.ENOENT, f"no inode {ino}")
        return r[0]

    def setattr(self, ino: int, ch: SetAttr) -> Attr:
        """Change mode, owner, size or times; ctime follows every change."""
        with self.lock:
            self._check_open()
            self.refuse_setattr(ino, ch)
            if ch.size is not None:
                self._reserve_tail(self._row(ino), ch.size)
            return self._setattr(ino, ch)

    @operation
    def _setattr(self, ino: int, ch: SetAttr) -> Attr:
        r = self._row(ino)
        now = now_ns()
        sets: list[str] = []
        args: list[Any] = []
        if ch.size is not None:
            # Every truncation sets mtime, even to the same size (as ext4 and btrfs do).
            if ch.size != r[5]:
                self._truncate(r, ch.size)
            else:
                self._check_truncatable(r, ch.size)
            sets.append("mtime_ns=?")
            args.append(now if ch.mtime_ns is None else ch.mtime_ns)
        mode = r[1] if ch.mode is None else stat.S_IFMT(r[1]) | (ch.mode & 0o7777)
        if ch.kill_setid and not stat.S_ISDIR(mode):
            mode = without_setid(mode)
        if ch.mode is not None or mode != r[1]:
            sets.append("mode=?")
            args.append(mode)
        if ch.mode is not None:
            self._acl_follows_mode(ino, ch.mode)
        if ch.uid is not None:
            sets.append("uid=?")
            args.append(ch.uid)
        if ch.gid is not None:
            sets.append("gid=?")
            args.append(ch.gid)
        if ch.atime_ns is not None:
            sets.append("atime_ns=?")
            args.append(ch.atime_ns)
        if ch.mtime_ns is not None and "mtime_ns=?" not in sets:
            sets.append("mtime_ns=?")
            args.append(ch.mtime_ns)
        sets.append("ctime_ns=?")
        args.append(now if ch.ctime_ns is None else ch.ctime_ns)
        self.db.change(f"UPDATE inodes SET {', '.join(sets)} WHERE id=?", (*args, ino))
        return self._attr(self._row(ino))

    @query
    def readlink(self, ino: int) -> bytes:
        """The target of a symbolic link."""
        r = self._row(ino)
        if not stat.S_ISLNK(r[1]):
            raise FSError(errno.EINVAL, f"inode {ino} is not a symbolic link")
        self._accessed(r)
        return bytes(self.db.value("SELECT target FROM inodes WHERE id=?", (ino,)))

    # --- removing names -----------------------------------------------------------------------

    def _existing(self, parent: int, name: bytes) -> tuple[int, int, tuple]:
        """(dentry id, inode, inode row) of an existing name."""
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        e = self._entry(parent, name)  # two indexed lookups: faster than a join (see find)
        r = self.db.row(_ROW_SQL, (e[1],)) if e else None
        if e is None or r is None:
            raise self._no_name(parent, name)
        return e[0], e[1], r

    def _no_name(self, parent: int, name: bytes) -> FSError:
        """The error for a name missing from `parent`: ENOTDIR or ENOENT for the parent
        itself, else ENOENT."""
        self._dir_row(parent)
        return FSError(errno.ENOENT, f"{name!r} not in directory {parent}")

    def _has_entries(self, ino: int) -> bool:
        return self.db.row("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (ino,)) is not None

    @operation
    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory name; the inode goes with its last name and last close."""
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        # The name goes first (one statement that also says what it named); the operation's
        # savepoint puts it back if it named a directory.
        e = self.db.take("DELETE FROM dentries WHERE parent=? AND name=? RETURNING inode",
                         (parent, name))
        r = self.db.row("SELECT mode, nlink, sectors FROM inodes WHERE id=?", e) if e else None
        if r is None:
            raise self._no_name(parent, name)
        self.refuse_removal(parent, e[0])
        if stat.S_ISDIR(r[0]):
            raise FSError(errno.EISDIR, f"{name!r} is a directory")
        self._name_removed(parent, e[0], *r)

    @operation
    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory."""
        if name == b".":
            raise FSError(errno.EINVAL, "cannot remove '.'")
        if name == b"..":
            raise FSError(errno.ENOTEMPTY, "cannot remove '..'")
        did, ino, r = self._existing(parent, name)
        self.refuse_removal(parent, ino)
        if not stat.S_ISDIR(r[1]):
            raise FSError(errno.ENOTDIR, f"{name!r} is not a directory")
        if self._has_entries(ino):
            raise FSError(errno.ENOTEMPTY, f"directory {name!r} is not empty")
        self._remove_entry(did, parent, ino, r)

    def _remove_entry(self, did: int, parent: int, ino: int, r: tuple) -> None:
        self.db.change("DELETE FROM dentries WHERE id=?", (did,))
        self._name_removed(parent, ino, r[1], r[2], r[10])

    def _name_removed(self, parent: int, ino: int, mode: int, nlink: int, sectors: int) -> None:
        """Follow the removal of a name of inode `ino` (its row's mode, nlink and sectors) from
        `parent`: link counts and times, and the inode itself once nothing holds it."""
        now = now_ns()
        is_dir = stat.S_ISDIR(mode)
        left = 0 if is_dir else nlink - 1
        if left <= 0 and not self._hold_unlinked(ino, sectors):
            self._free_inode(ino, sectors)
        else:
            self.db.change("UPDATE inodes SET nlink=?, ctime_ns=? WHERE id=?", (left, now, ino))
        if is_dir:
            self._add_links(parent, -1)
        self._touch(parent, now=now)

    # --- times and bulk changes (open files and contents: vfs/content.py) ----------------------

    def atime_due(self, a: Attr) -> bool:
        """True if reading `a` now would update its atime: as relatime does, when it is not
        newer than mtime or ctime, or a day old; never on a read-only, noatime (or, for a
        directory, nodiratime) mount."""
        return (self._atime_due(a.mode, a.atime_ns, a.mtime_ns, a.ctime_ns)
                and not self.no_atime(a.ino))

    def _atime_due(self, mode: int, atime: int, mtime: int, ctime: int) -> bool:
        if self.db.read_only or self.noatime or (self.nodiratime and stat.S_ISDIR(mode)):
            return False
        return atime <= mtime or atime <= ctime or now_ns() - atime > RELATIME_SECONDS * 10**9

    def _accessed(self, r: tuple) -> None:
        """Update the atime of inode row `r` after a read, if it is due (`atime_due`)."""
        if self._atime_due(r[1], r[7], r[8], r[9]) and not self.no_atime(r[0]):
            self.db.change("UPDATE inodes SET atime_ns=? WHERE id=?", (now_ns(), r[0]))

    @operation
    def atomically(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` under the lock, all-or-nothing (for bulk changes made elsewhere in
        vfs, such as a ghost import)."""
        return fn(*args)

    # --- directories --------------------------------------------------------------------------

    @query
    def opendir(self, ino: int) -> None:
        """Open a directory for listing; a removed directory lives on until its last close
        (fstat of an open, removed directory shows it with no links, as Linux does)."""
        self._dir_row(ino)
        self.opens[ino] = self.opens.get(ino, 0) + 1

    @operation
    def releasedir(self, ino: int) -> None:
        """Close one open of a directory."""
        self.release(ino)

    @query
    def readdir(self, ino: int, cookie: int, limit: int = 256) -> list[DirEntry]:
        """Entries after `cookie` (0 starts at '.'), with attributes and resume cookies."""
        r = self._dir_row(ino)
        if r[2] == 0:
            return []  # removed while open: nothing to list, as ext4
        if cookie == 0:
            self._accessed(r)
        out: list[DirEntry] = []
        if cookie == 0:
            out.append(DirEntry(b".", self._attr(r), 1))
        if cookie <= 1:
            out.append(DirEntry(b"..", self._attr(self._row(self._parent_of(ino))), 2))
        after = max(cookie - 2, 0)
        for row in self.db.rows(
            f"SELECT d.id, d.name, {JOINED_COLUMNS}"
            " FROM dentries d JOIN inodes i ON i.id = d.inode"
            " WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
            (ino, after, limit),
        ):
            out.append(DirEntry(bytes(row[1]), self._attr(row[2:]), row[0] + 2))
        return out

    # --- whole filesystem ---------------------------------------------------------------------

    @query
    def statfs(self) -> dict[str, int]:
        """Sizes for statfs(2), in 4 KiB units."""
        inodes = self.db.value("SELECT count(*) FROM inodes", (), 0)
        free = self.free_sectors()
        return {
            "bsize": SECTOR,
            "frsize": SECTOR,
            "blocks": self.alloc.total - RESERVED_SECTORS,
            "bfree": free,
            "bavail": free,
            "files": inodes + free,
            "ffree": 0 if self.metadata_shortage() else free,  # df -i: no new inodes now
            "namemax": NAME_MAX,
        }

    def free_sectors(self) -> int:
        """Sectors that file data may still take."""
        # Held sectors come back at the next commit (made on demand by a write that needs
        # them), those of removed files at the kernel's FORGET, which comes a moment after
        # the unlink (a write that needs them waits for it); dirty sectors have space
        # promised to them, and the next metadata copy has its room kept.
        return max(0, self.alloc.free_count + self.alloc.held_count + self._held_for_the_kernel()
                   - self.data.dirty_bytes // SECTOR - self.copy_reserve)

    def free_space(self) -> FreeSpace:
        """The volume space no file uses, for the volume's scrub (which takes this lock)."""
        return FreeSpace(self.alloc, self.lock)

    def _parity_only_sectors(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """The allocator's guard: the volume's parity-only chunks near a run, in sectors."""
        return [(o // SECTOR, -(-n // SECTOR), -(-e // SECTOR)) for o, n, e in
                self.volume.parity_only_chunks(start * SECTOR, count * SECTOR)]

    def commit(self, head_start: bool = False, log: bool = False) -> None:
        """Make every change so far durable: file data first, then the metadata.

        `head_start` first flushes the volume without the lock, so the data already written
        reaches the disk while writers go on, and the locked part has less to wait for (the
        background commit). `log` (fsync) lets little unflushed data go into the intent log,
        committed with the metadata, instead of flushing the volume (see vfs.intentlog).
        Read-only, there is nothing to commit, and an intent log left by a crash stays.
        """
        if self.db.read_only:
            return
        if head_start and not self._closed:
            self.volume.flush()
        with self.lock:
            self._check_open()
            self._stop_if_lost("the commit")
            if self.free_later:
                self._free_unlinked(self.free_later)
                self.free_later = []
            self.alloc.mark()
            try:
                self.data.write_out_all()
            except FSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # Some dirty blocks found no room (space promised to them was taken by the
                # metadata copy, or freed sectors are still held). Commit everything else so
                # the held sectors come back, then try the rest once more; what still does not
                # fit stays dirty and the caller (fsync) gets ENOSPC.
                log.warning("commit: %s; committing the rest, then retrying", exc)
                self.volume.flush()
                self.volume.forget()
                self._commit_db()
                self.alloc.release()
                self.alloc.mark()
                self.data.write_out_all()
            if log and self.volume.can_log():
                self.volume.log_pending()
            else:
                self.volume.flush()
                self.volume.forget()
            self.db.compact()
            self._commit_db()
            self.alloc.release()
            self.copy_reserve = copy_reserve(self.db)

    def small_commit(self) -> bool:
        """Whether a commit now would be a small one: what it writes out, and everything not
        yet flushed, goes into the intent log, without a flush of the volume (an fsync after a
        few KiB). Read without the lock: a hint for where to run the commit."""
        return self.volume.would_log(self.data.dirty_bytes)

    def needs_commit(self) -> bool:
        """True if there are changes not yet durable."""
        if self._stopped is not None:
            return False
        return self.db.dirty or bool(self.data.dirty) or bool(self.free_later)

    def close(self) -> None:
        """Commit and stop; the volume stays open (its owner closes it)."""
        with self.lock:
            if self._closed:
                return
            if self._stopped is None:
                self.commit()
            self._closed = True
