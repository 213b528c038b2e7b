"""The metadata database (SQLite through apsw): schema, format checks and transactions."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import apsw

from vfs.errors import FSError, MetadataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
META_NAME = "meta.db"
INCREMENTAL_VACUUM = 2  # PRAGMA auto_vacuum: free pages can be given back without a VACUUM
COMPACT_MIN_FREE = 256  # pages (1 MiB): fewer free pages than this are left for reuse
COMPACT_FRACTION = 8  # ... and so are free pages that are under 1/8 of the file
WAL_KEEP_BYTES = 32 * 1024 * 1024  # the write-ahead log's size kept after a checkpoint
CACHE_BYTES = 64 * 1024 * 1024  # SQLite's page cache: what a commit may write at once
# Free space kept on the disk that holds the database, besides what the open transaction adds
# to its pages: changes that would grow it are refused (ENOSPC) below that, so that the open
# transaction can always be committed (its pages still in the cache go to the write-ahead
# log) and checkpointed (the file takes its new pages). SQLite drops the whole open
# transaction when it cannot write it.
HOST_RESERVE = CACHE_BYTES + 16 * 1024 * 1024
ROOM_RECHECK = 0.05  # seconds a reading of that free space is trusted ...
NEAR_BYTES = 32 * 1024 * 1024  # ... unless it is within this of the reserve
DISK_FULL = apsw.FullError  # what SQLite raises when the database's disk is full

SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    rdev INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    sectors INTEGER NOT NULL DEFAULT 0,
    target BLOB
);
CREATE TABLE dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    inode INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_inode ON dentries (inode);
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
CREATE TABLE blocks (
    inode INTEGER NOT NULL,
    blkno INTEGER NOT NULL,
    addr INTEGER NOT NULL,
    nsect INTEGER NOT NULL,
    csum INTEGER NOT NULL,
    PRIMARY KEY (inode, blkno)
) WITHOUT ROWID;
CREATE INDEX blocks_addr ON blocks (addr);
CREATE TABLE metacopy (generation INTEGER NOT NULL, addr INTEGER NOT NULL, nsect INTEGER NOT NULL);
"""

# Format 2: what smart-folder queries search by, readdir's order, and ghost files (with
# ghost_links, the symbolic links an import made, which follow their source as ghosts do, and
# inode_flags, chattr's flags: added within format 2, so older databases get these tables and
# their triggers at a read-write open).
SCHEMA_2 = """
CREATE INDEX IF NOT EXISTS dentries_name ON dentries (name);
CREATE INDEX IF NOT EXISTS dentries_parent_id ON dentries (parent, id);
CREATE INDEX IF NOT EXISTS inodes_size ON inodes (size);
CREATE INDEX IF NOT EXISTS inodes_mtime ON inodes (mtime_ns);
CREATE INDEX IF NOT EXISTS xattrs_name ON xattrs (name, value);
-- an inode's attribute names without their values: listxattr, and the room check of every new
-- name (with 600 values of 30 KB on one file, 680 µs through the table, 18 through this)
CREATE INDEX IF NOT EXISTS xattrs_inode_name ON xattrs (inode, name);
CREATE TABLE IF NOT EXISTS ghosts (
    inode INTEGER PRIMARY KEY,
    source BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hashes BLOB,
    state TEXT NOT NULL,
    used_ns INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ghosts_state ON ghosts (state, used_ns);
CREATE TABLE IF NOT EXISTS ghost_links (inode INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS inode_flags (inode INTEGER PRIMARY KEY, flags INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS inode_flags_gone AFTER DELETE ON inodes BEGIN
    DELETE FROM inode_flags WHERE inode = old.id;
END;
CREATE TRIGGER IF NOT EXISTS inodes_gone AFTER DELETE ON inodes BEGIN
    DELETE FROM xattrs WHERE inode = old.id;
    DELETE FROM ghosts WHERE inode = old.id;
    DELETE FROM ghost_links WHERE inode = old.id;
END;
"""

# Format 3: the block map holds extents of 4 KiB sectors with a checksum per sector (see
# vfs/extents.py); format-2 blocks become extents that keep their one checksum per block.
SCHEMA_3 = """
CREATE TABLE extents (
    inode INTEGER NOT NULL,
    sector INTEGER NOT NULL,
    nsect INTEGER NOT NULL,
    addr INTEGER NOT NULL,
    csums BLOB,
    row_csum INTEGER,
    PRIMARY KEY (inode, sector)
) WITHOUT ROWID;
CREATE INDEX extents_addr ON extents (addr);
INSERT INTO extents (inode, sector, nsect, addr, csums, row_csum)
    SELECT inode, blkno * 16, nsect, addr, NULL, csum FROM blocks;
DROP TABLE blocks;
"""


class MetaDB:
    """One connection to a warehouse's metadata database, always inside a transaction."""

    def __init__(self, path: str, create: bool = False, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        exists = os.path.exists(path)
        if not exists and not create:
            raise MetadataError(f"metadata database {path} is missing")
        if exists and create:
            raise MetadataError(f"metadata database {path} already exists")
        try:
            if read_only:
                self.conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
            else:
                self.conn = apsw.Connection(path)
            self.conn.setbusytimeout(5000)
            # Plans that do not depend on bound values. Without this, this SQLite re-plans a
            # statement with ORDER BY and a bound range at every run: readdir's query took
            # 13 µs instead of 3.5, a read's block-map lookup 45 instead of 25.
            self.conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 1)
            if create:  # before anything is written: the WAL switch already writes page 1
                self.conn.execute(f"PRAGMA auto_vacuum={INCREMENTAL_VACUUM}")
            if not read_only:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
                # The log grows to the largest transaction (100,000 names made within one
                # commit interval: 95 MB); once checkpointed, it is cut back to this.
                self.conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            self.conn.execute(f"PRAGMA cache_size=-{CACHE_BYTES // 1024}")
            self.conn.execute("PRAGMA temp_store=MEMORY")
            if create:
                with self.conn:
                    self.conn.execute(SCHEMA)
                    self.conn.execute(SCHEMA_2)
                    self.conn.execute(SCHEMA_3)
                    self.conn.execute("INSERT INTO settings VALUES ('format', ?)",
                                      (FORMAT_VERSION,))
            else:
                self._check_format()
                if not read_only:
                    self._make_compactable()
            # Birth times came within format 3: a database made before them and opened
            # read-only has none to show.
            if not read_only:
                self._add_columns()
            self.has_btime = not read_only or self._has_btime()
        except apsw.Error as exc:
            raise MetadataError(f"metadata database {path}: {exc}") from exc
        self.conn.execute("BEGIN")
        self.dirty = False
        self._cursors = threading.local()
        self._room = 0  # free bytes on the database's disk, read at _room_at
        self._compaction_held = False  # free pages were last kept for want of disk space
        self._file_bytes = 0  # the database file's size, read at _room_at
        self._room_at = float("-inf")
        self._short = False  # the disk's room was found short (and logged)
        self._gone_told = False  # the file's removal while open was logged
        self.page_size = self.conn.execute("PRAGMA page_size").fetchall()[0][0]

    def _cursor(self) -> apsw.Cursor:
        """This thread's cursor for statements whose results are taken at once: making a new
        cursor costs as much as a simple indexed query (about 2.5 µs)."""
        try:
            return self._cursors.cursor
        except AttributeError:
            cursor = self._cursors.cursor = self.conn.cursor()
            return cursor

    def _renew_trigger(self) -> None:
        """Give a database made before ghost_links the trigger that also clears it."""
        sql = self.conn.execute("SELECT sql FROM sqlite_master WHERE type='trigger' AND "
                                "name='inodes_gone'").fetchone()
        if sql is not None and "ghost_links" not in sql[0]:
            log.info("%s: renewing the trigger inodes_gone (it now clears ghost_links too)",
                     self.path)
            self.conn.execute("DROP TRIGGER inodes_gone")
            self.conn.execute(SCHEMA_2)

    def _has_btime(self) -> bool:
        return any(c[1] == "btime_ns"
                   for c in self.conn.execute("PRAGMA table_info(inodes)").fetchall())

    def _add_columns(self) -> None:
        """Give a database made before them the columns added within format 3: inodes'
        birth times (NULL for the inodes it already holds, which have none to show)."""
        if not self._has_btime():
            with self.conn:
                self.conn.execute("ALTER TABLE inodes ADD COLUMN btime_ns INTEGER")

    def _make_compactable(self) -> None:
        """Switch a database made without incremental auto-vacuum to it (one VACUUM, once), so
        that `compact` can give free pages back."""
        if self.conn.execute("PRAGMA auto_vacuum").fetchall()[0][0] == INCREMENTAL_VACUUM:
            return
        pages = self.conn.execute("PRAGMA page_count").fetchall()[0][0]
        log.info("%s: rebuilding the metadata database (%d pages) once so that its free pages "
                 "can be given back", self.path, pages)
        self.conn.execute(f"PRAGMA auto_vacuum={INCREMENTAL_VACUUM}")
        self.conn.execute("PRAGMA temp_store=FILE")  # the copy VACUUM makes: on disk, not RAM
        try:
            self.conn.execute("VACUUM")
        finally:
            self.conn.execute("PRAGMA temp_store=MEMORY")

    def _check_format(self) -> None:
        try:
            row = self.conn.execute("SELECT value FROM settings WHERE key='format'").fetchone()
        except apsw.SQLError as exc:
            raise MetadataError(f"{self.path} is not a dwfs metadata database: {exc}") from exc
        if row is not None and row[0] in (1, 2):
            if self.read_only:
                raise MetadataError(
                    f"{self.path}: metadata format {row[0]} must be upgraded to "
                    f"{FORMAT_VERSION}, which cannot be done read-only; mount it read-write once",
                    errno.EROFS)
            log.info("%s: upgrading the metadata from format %d to %d", self.path, row[0],
                     FORMAT_VERSION)
            with self.conn:
                self.conn.execute(SCHEMA_2)  # format 2: indexes, ghosts
                self._renew_trigger()
                self.conn.execute(SCHEMA_3)  # format 3: extents
                self.conn.execute("UPDATE settings SET value=? WHERE key='format'",
                                  (FORMAT_VERSION,))
            return
        if row is not None and row[0] == FORMAT_VERSION:
            if not self.read_only:
                with self.conn:  # what was added within format 2 (a no-op when present)
                    self.conn.execute(SCHEMA_2)
                    self._renew_trigger()
            return
        if row is None or row[0] != FORMAT_VERSION:
            found = row[0] if row else "none"
            raise MetadataError(
                f"{self.path}: metadata format {found}, this dwfs reads format {FORMAT_VERSION}")

    def execute(self, sql: str, args: Iterable[Any] = ()) -> apsw.Cursor:
        """Run one statement inside the open transaction."""
        return self.conn.execute(sql, tuple(args))

    def change(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run one modifying statement; returns the number of rows changed."""
        self._cursor().execute(sql, tuple(args))
        self.dirty = True
        return self.conn.changes()

    def take(self, sql: str, args: Iterable[Any] = ()) -> tuple | None:
        """Run one modifying statement with a RETURNING clause; the first row it returned."""
        rows = self._cursor().execute(sql, tuple(args)).fetchall()
        self.dirty = True
        return rows[0] if rows else None

    def changemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        """Run one modifying statement for each row of arguments."""
        self.conn.executemany(sql, rows)
        self.dirty = True

    def row(self, sql: str, args: Iterable[Any] = ()) -> tuple | None:
        """The first row of a query, or None.

        The statement is run to its end (these queries give one row, or a few): a statement
        left in the middle keeps the connection's read snapshot open across commits, and no
        checkpoint can then reuse the write-ahead log, which grew by every commit (half a GB
        within minutes of fsyncs) for as long as the filesystem stayed mounted.
        """
        rows = self._cursor().execute(sql, tuple(args)).fetchall()
        return rows[0] if rows else None

    def value(self, sql: str, args: Iterable[Any] = (), default: Any = None) -> Any:
        """The first column of the first row of a query, or `default` (run to its end, as
        `row`)."""
        rows = self._cursor().execute(sql, tuple(args)).fetchall()
        return rows[0][0] if rows else default

    def rows(self, sql: str, args: Iterable[Any] = ()) -> Iterator[tuple]:
        """All rows of a query."""
        return iter(self.conn.execute(sql, tuple(args)))

    def last_id(self) -> int:
        """The rowid of the last insert."""
        return self.conn.last_insert_rowid()

    def setting(self, key: str, default: Any = None) -> Any:
        """A value from the settings table."""
        return self.value("SELECT value FROM settings WHERE key=?", (key,), default)

    def set_setting(self, key: str, value: Any) -> None:
        """Store a value in the settings table."""
        self.change("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def check_room(self) -> None:
        """ENOSPC if the disk holding the database is short of room (`room_shortage`)."""
        short = self.room_shortage()
        if short is not None:
            raise FSError(errno.ENOSPC, short)

    def room_shortage(self) -> str | None:
        """Why a change that would grow the database is refused now (its disk has less free
        than HOST_RESERVE and the pages the open transaction adds to the file), or None."""
        pages = self.pages_bytes()
        if (time.monotonic() - self._room_at > ROOM_RECHECK
                or self._room < self._reserve(pages) + NEAR_BYTES):  # (near or short: now)
            self._measure_room()
        reserve = self._reserve(pages)
        self._tell_room(self._room < reserve)
        if self._room >= reserve:
            return None
        mib = 1024 * 1024
        return (f"the disk holding {self.path} has {self._room // mib} MiB free, less than "
                f"the {reserve // mib} MiB kept for it")

    def _reserve(self, pages: int) -> int:
        """The room kept on the disk for a database of `pages` bytes, with the open
        transaction: HOST_RESERVE and what its checkpoint adds to the file."""
        return HOST_RESERVE + max(0, pages - self._file_bytes)

    def pages_bytes(self) -> int:
        """The database's size with the open transaction's changes."""
        return self.value("PRAGMA page_count") * self.page_size

    def _measure_room(self) -> None:
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        self._room, self._room_at = st.f_bavail * st.f_frsize, time.monotonic()
        try:
            self._file_bytes = os.stat(self.path).st_size
        except FileNotFoundError as exc:
            (log.error if self._gone_told else log.critical)(
                "%s was removed while the filesystem is mounted: nothing more can be "
                "committed; unmount, then `dwfs fsck --repair` restores it from the copy "
                "written to the volume at unmount", self.path)
            self._gone_told = True
            raise MetadataError(f"{self.path} was removed while in use") from exc

    def _tell_room(self, short: bool) -> None:
        """Log when the database's disk runs short of room and when it has room again."""
        if short == self._short or self.read_only:
            return
        self._short = short
        (log.warning if short else log.info)(
            "%s: %d MiB free on its disk: %s", self.path, self._room >> 20,
            "new files and attributes get ENOSPC until more is free (removals go on, in the "
            "write-ahead log's room)" if short else "room again for new files and attributes")

    def transaction_lost(self) -> bool:
        """True if SQLite rolled back the whole open transaction (it does after a full disk or
        an I/O error in the middle of writing it): everything since the last commit is gone."""
        return bool(self.conn.getautocommit())

    def commit(self) -> None:
        """Make everything since the last commit durable, then open the next transaction."""
        self.conn.execute("COMMIT")
        self.conn.execute("BEGIN")
        self.dirty = False

    def rollback(self) -> None:
        """Drop everything since the last commit."""
        self.conn.execute("ROLLBACK")
        self.conn.execute("BEGIN")
        self.dirty = False

    def compact(self) -> int:
        """Give free pages back (the file shrinks at the next checkpoint) when they are many:
        deleting a large tree must not leave the database, and with it every metadata copy and
        the space held for the next one, at its largest size. Returns the pages given back."""
        free = self.value("PRAGMA freelist_count")
        if free < COMPACT_MIN_FREE or free * COMPACT_FRACTION < self.value("PRAGMA page_count"):
            return 0
        # Moving pages writes them to the write-ahead log: up to two pages for each freed,
        # which must fit beside the reserve (on a nearly full disk it waits for more room).
        self._measure_room()
        if self._room - 2 * free * self.page_size < self._reserve(self.pages_bytes()):
            # Said once until pages can be moved again (this is tried at every commit).
            (log.debug if self._compaction_held else log.info)(
                "%s: %d free pages kept: %d MiB free on its disk is too little to move pages "
                "now", self.path, free, self._room >> 20)
            self._compaction_held = True
            return 0
        self._compaction_held = False
        # One result row per page moved: the statement must run to its end.
        self._cursor().execute("PRAGMA incremental_vacuum").fetchall()
        self.dirty = True
        left = self.value("PRAGMA freelist_count")
        log.debug("%s: gave %d free pages back (%d left)", self.path, free - left, left)
        return free - left

    def image(self) -> bytes:
        """The committed database as one byte string (for the copy kept on the volume)."""
        return self.conn.serialize("main")

    def integrity_errors(self) -> list[str]:
        """SQLite's own integrity check; empty when the database is sound."""
        rows = [r[0] for r in self.conn.execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def close(self) -> None:
        """Commit what is pending and close the connection."""
        if self.transaction_lost():
            log.error("%s: final commit: the open transaction was lost; nothing to commit",
                      self.path)
        else:
            try:
                self.conn.execute("COMMIT")
            except apsw.Error as exc:  # a database damaged at open lands here too
                (log.error if self.dirty else log.warning)("%s: final commit: %s", self.path,
                                                           exc)
        self.conn.close()
