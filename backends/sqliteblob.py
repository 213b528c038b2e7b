"""A member stored as fixed-size blob pages in an SQLite database (through apsw)."""

from __future__ import annotations

import logging
import os
import threading

import apsw

from backends.member import Member, MemberIOError

log = logging.getLogger(__name__)

PAGE_SIZE = 64 * 1024


class SqliteBlobMember(Member):
    """A member whose bytes live in an SQLite table of 64 KiB blob pages; absent pages are zeros."""

    def __init__(self, path: str, conn: apsw.Connection, capacity: int, page_size: int) -> None:
        self.path = path
        self.capacity = capacity
        self._conn = conn
        self._page = page_size
        self._lock = threading.Lock()
        self._in_tx = False
        self._ino = os.stat(path).st_ino

    @staticmethod
    def _connect(path: str, flags: int) -> apsw.Connection:
        conn = apsw.Connection(path, flags=flags)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def create(cls, path: str, capacity: int, page_size: int = PAGE_SIZE) -> SqliteBlobMember:
        """Create a new member database of `capacity` bytes; refuses an existing file."""
        if os.path.exists(path):
            raise MemberIOError(path, "create", "file exists")
        try:
            conn = cls._connect(path, apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
            with conn:
                conn.execute(
                    "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
                    "CREATE TABLE pages(idx INTEGER PRIMARY KEY, data BLOB NOT NULL);"
                )
                conn.execute(
                    "INSERT INTO meta VALUES ('capacity', ?), ('page_size', ?)",
                    (capacity, page_size),
                )
        except apsw.Error as exc:
            raise MemberIOError(path, "create", str(exc)) from exc
        return cls(path, conn, capacity, page_size)

    @classmethod
    def open(cls, path: str) -> SqliteBlobMember:
        """Open an existing member database."""
        if not os.path.exists(path):
            raise MemberIOError(path, "open", "No such file or directory")
        try:
            conn = cls._connect(path, apsw.SQLITE_OPEN_READWRITE)
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        except apsw.Error as exc:
            raise MemberIOError(path, "open", f"not a dwfs SQLite member: {exc}") from exc
        return cls(path, conn, int(meta["capacity"]), int(meta["page_size"]))

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        self._check_range(offset, len(buffer), "read")
        with self._lock:
            try:
                for idx, start, lo, hi in self._pages(offset, len(buffer)):
                    part = buffer[lo:hi]
                    try:
                        blob = self._conn.blob_open("main", "pages", "data", idx, False)
                    except apsw.SQLError:
                        part[:] = bytes(hi - lo)  # never written: zeros
                        continue
                    with blob:
                        blob.seek(start)
                        blob.readinto(part)
            except apsw.Error as exc:
                raise MemberIOError(self.path, "read", str(exc)) from exc

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view), "write")
        with self._lock:
            try:
                if not self._in_tx:
                    self._conn.execute("BEGIN")
                    self._in_tx = True
                for idx, start, lo, hi in self._pages(offset, len(view)):
                    self._conn.execute(
                        "INSERT OR IGNORE INTO pages VALUES (?, zeroblob(?))", (idx, self._page)
                    )
                    with self._conn.blob_open("main", "pages", "data", idx, True) as blob:
                        blob.seek(start)
                        blob.write(view[lo:hi])
            except apsw.Error as exc:
                raise MemberIOError(self.path, "write", str(exc)) from exc

    def _pages(self, offset: int, length: int):
        pos = 0
        while pos < length:
            idx, start = divmod(offset + pos, self._page)
            n = min(self._page - start, length - pos)
            yield idx, start, pos, pos + n
            pos += n

    def flush(self) -> None:
        with self._lock:
            if not self._in_tx:
                return
            try:
                self._conn.execute("COMMIT")
            except apsw.Error as exc:
                raise MemberIOError(self.path, "flush", str(exc)) from exc
            finally:
                self._in_tx = False

    def check(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise MemberIOError(self.path, "check", exc.strerror or str(exc)) from exc
        if st.st_ino != self._ino:
            raise MemberIOError(self.path, "check", "the database file was replaced")

    def close(self) -> None:
        with self._lock:
            try:
                if self._in_tx:
                    self._conn.execute("COMMIT")
                    self._in_tx = False
                self._conn.close()
            except apsw.Error as exc:
                raise MemberIOError(self.path, "close", str(exc)) from exc
