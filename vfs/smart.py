"""Smart folders: directories whose entries are the live result of a saved query.

A smart folder is an empty directory carrying the `user.dwfs.query` attribute. Its entries are
the matching inodes themselves, found by running the compiled query in the metadata database
each time the folder is listed or a name in it is looked up. Two matches with one name are told
apart by the inode number: the lowest inode keeps the plain name, the others are shown as
`stem #INODE.ext`, which stays the same for as long as the file matches.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from dataclasses import dataclass

from vfs.attrs import ROOT_INODE
from vfs.errors import FSError
from vfs.metadb import MetaDB
from vfs.query import Query, QueryError, compile_where, parse
from vfs.xattrnames import QUERY_XATTR

log = logging.getLogger(__name__)

_SUFFIXED = re.compile(rb"^(?P<stem>.*) #(?P<ino>[0-9]+)(?P<ext>\.[^.]*)?$", re.DOTALL)


def suffixed(name: bytes, ino: int) -> bytes:
    """The name a clashing match is shown under: `stem #INODE.ext`."""
    stem, ext = os.path.splitext(name)
    if not stem:  # a dot file such as `.bashrc`: no extension to keep apart
        stem, ext = name, b""
    return stem + b" #%d" % ino + ext


@dataclass(slots=True)
class Match:
    """One entry of a smart folder: the name shown and the matching inode's row."""

    name: bytes
    row: tuple


class SmartFolders:
    """The smart folders of one filesystem: their queries and their live contents."""

    def __init__(self, db: MetaDB, columns: str, resolve_dir) -> None:
        self.db = db
        self.columns = columns  # the inode columns a Filesystem turns into attributes
        self.resolve_dir = resolve_dir
        self.queries: dict[int, Query] = {}
        for ino, text in db.rows("SELECT inode, value FROM xattrs WHERE name=?",
                                 (QUERY_XATTR,)):
            try:
                self.queries[ino] = parse(bytes(text).decode())
            except (QueryError, UnicodeDecodeError) as exc:
                log.error("smart folder inode %d: stored query does not parse (%s); it lists "
                          "nothing until the query is set again", ino, exc)

    def is_smart(self, ino: int) -> bool:
        """True if inode `ino` is a smart folder."""
        return ino in self.queries

    @staticmethod
    def parse(value: bytes) -> Query:
        """A query from an attribute value, or EINVAL saying what is wrong and where."""
        try:
            query = parse(value.decode())
            compile_where(query, lambda _path: None, time.time_ns())  # names resolve
            return query
        except UnicodeDecodeError as exc:
            raise FSError(errno.EINVAL, f"smart folder query is not UTF-8: {exc}") from exc
        except QueryError as exc:
            raise FSError(errno.EINVAL, str(exc)) from exc

    def define(self, ino: int, mode: int, has_entries: bool, query: Query) -> None:
        """Make directory `ino` a smart folder (the caller stores the attribute)."""
        if ino == ROOT_INODE:
            raise FSError(errno.EPERM, "the root directory cannot be a smart folder")
        if not stat.S_ISDIR(mode):
            raise FSError(errno.ENOTDIR, f"inode {ino}: only a directory can be a smart folder")
        if has_entries and ino not in self.queries:
            raise FSError(errno.ENOTEMPTY,
                          f"directory inode {ino} is not empty; a smart folder starts empty")
        self.queries[ino] = query
        log.info("inode %d is a smart folder: %s", ino, query.text)

    def forget(self, ino: int) -> None:
        """Inode `ino` is no longer a smart folder."""
        if self.queries.pop(ino, None) is not None:
            log.info("inode %d is no longer a smart folder", ino)

    def _select(self, ino: int, extra: str = "", args: tuple = ()) -> list[tuple]:
        query = self.queries.get(ino)
        if query is None:
            return []
        try:
            where, params = compile_where(query, self.resolve_dir, time.time_ns())
        except QueryError as exc:  # an owner or group deleted since the query was set
            raise FSError(errno.EIO, f"smart folder inode {ino}: {exc}") from exc
        sql = (f"SELECT d.name, min(d.id), {self.columns} FROM dentries d "
               "JOIN inodes i ON i.id = d.inode "
               f"WHERE ({where}) AND i.id != ? {extra} AND NOT EXISTS "
               "(SELECT 1 FROM xattrs q WHERE q.inode = i.id AND q.name = ?) "
               "GROUP BY i.id ORDER BY i.id")
        return list(self.db.rows(sql, (*params, ROOT_INODE, *args, QUERY_XATTR)))

    def listing(self, ino: int) -> list[Match]:
        """Every entry of smart folder `ino`, in a stable order, names made unique."""
        rows = self._select(ino)
        seen: set[bytes] = set()
        out: list[Match] = []
        for r in rows:  # ordered by inode: the lowest inode of a name keeps it
            name = bytes(r[0])
            if name in seen:
                name = suffixed(name, r[2])
            seen.add(name)
            out.append(Match(name, r[2:]))
        return out

    def _shown_as(self, ino: int, name: bytes) -> list[tuple]:
        """The matches of smart folder `ino` that the listing shows under `name` before
        clashes are told apart (their first matching name is `name`), lowest inode first."""
        rows = self._select(ino, "AND i.id IN (SELECT inode FROM dentries WHERE name = ?)",
                            (name,))
        return [r for r in rows if bytes(r[0]) == name]

    def lookup(self, ino: int, name: bytes) -> tuple | None:
        """The inode row shown as `name` in smart folder `ino`, or None (as `listing`
        names them)."""
        rows = self._shown_as(ino, name)
        if rows:
            return rows[0][2:]
        m = _SUFFIXED.match(name)
        if m is None:
            return None
        plain = m["stem"] + (m["ext"] or b"")
        target = int(m["ino"])
        for r in self._shown_as(ino, plain)[1:]:
            if r[2] == target and suffixed(plain, target) == name:
                return r[2:]
        return None
