"""Offline consistency check (and repair) of a filesystem's metadata against its volume.

Checks, in order: SQLite's own integrity; the root directory; names pointing at missing
inodes or from non-directories; inodes nobody names (files unlinked while open when the
filesystem last stopped are orphans, not problems: the next mount frees them, as a repair
does; named ones lost by a damaged directory go to /lost+found); link counts; block-map
extents that are malformed, outside the volume, overlapping others, past the end of their
file or of deleted inodes; ghost records of missing or non-regular inodes; smart folders
that hold entries of their own; optionally every stored extent read back and checked
against its checksum.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vfs.alloc import SECTOR
from vfs.attrs import ROOT_INODE
from vfs.errors import FSError
from vfs.extents import FORMAT2_BLOCK_SECTORS, GROUP_SECTORS, Extent, ExtentMap
from vfs.fs import RESERVED_SECTORS
from vfs.metadb import MetaDB
from vfs.xattrnames import QUERY_XATTR

log = logging.getLogger(__name__)

LOST_FOUND = b"lost+found"


@dataclass
class FsckReport:
    """What fsck found and, with repair, mended."""

    problems: list[str] = field(default_factory=list)
    repaired: bool = False
    damaged_files: list[int] = field(default_factory=list)
    # Inodes unlinked while open (or while the kernel held them) when the filesystem last
    # stopped, a crash: not a fault, the next read-write mount frees them (so does repair).
    orphans: list[int] = field(default_factory=list)
    inodes: int = 0
    extents: int = 0
    extents_verified: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing was found."""
        return not self.problems

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {"clean": self.clean, "problems": self.problems, "repaired": self.repaired,
                "damaged_inodes": self.damaged_files, "orphans": self.orphans,
                "inodes": self.inodes,
                "extents": self.extents, "extents_verified": self.extents_verified}


class Checker:
    """One fsck run over a database and, for block checks, the volume."""

    def __init__(self, db: MetaDB, volume, repair: bool) -> None:
        self.db = db
        self.volume = volume
        self.repair = repair
        self.report = FsckReport(repaired=repair)

    def problem(self, text: str) -> None:
        log.warning("fsck: %s", text)
        self.report.problems.append(text)

    def run(self, verify_data: bool = False,
            progress: Callable[[int, int], None] | None = None) -> FsckReport:
        """Run every check; with repair, fix what is found and commit."""
        errors = self.db.integrity_errors()
        if errors:
            self.problem(f"SQLite integrity check failed: {'; '.join(errors[:5])}")
            raise FSError(5, "the metadata database is corrupt; restore it from the copy "
                          "on the volume (dwfs fsck --repair)")
        self._root()
        self._names()
        self._unnamed()
        self._link_counts()
        self._ghosts()
        self._smart_folders()
        self._extents()
        if verify_data:
            self._verify(progress)
        self.report.inodes = self.db.value("SELECT count(*) FROM inodes", (), 0)
        self.report.extents = self.db.value("SELECT count(*) FROM extents", (), 0)
        if self.repair:
            self.db.commit()
        else:
            self.db.rollback()
        return self.report

    def _root(self) -> None:
        r = self.db.row("SELECT mode FROM inodes WHERE id=?", (ROOT_INODE,))
        if r is None or not stat.S_ISDIR(r[0]):
            self.problem("the root directory is missing or not a directory")
            if self.repair:
                now = time.time_ns()
                self.db.change("INSERT OR REPLACE INTO inodes (id, mode, nlink, uid, gid, size, "
                               "atime_ns, mtime_ns, ctime_ns) VALUES (?, ?, 2, 0, 0, 0, ?, ?, ?)",
                               (ROOT_INODE, stat.S_IFDIR | 0o755, now, now, now))

    def _names(self) -> None:
        for did, parent, name, ino in list(self.db.rows(
                "SELECT d.id, d.parent, d.name, d.inode FROM dentries d "
                "LEFT JOIN inodes i ON i.id = d.inode WHERE i.id IS NULL")):
            self.problem(f"entry {bytes(name)!r} in directory {parent} names missing inode {ino}")
            if self.repair:
                self.db.change("DELETE FROM dentries WHERE id=?", (did,))
        for did, parent, name in list(self.db.rows(
                "SELECT d.id, d.parent, d.name FROM dentries d LEFT JOIN inodes p "
                "ON p.id = d.parent WHERE p.id IS NULL OR (p.mode & 0xF000) != 0x4000")):
            self.problem(f"entry {bytes(name)!r} lives in {parent}, which is not a directory")
            if self.repair:
                self.db.change("DELETE FROM dentries WHERE id=?", (did,))
        for ino, n in list(self.db.rows(
                "SELECT d.inode, count(*) FROM dentries d JOIN inodes i ON i.id = d.inode "
                "WHERE (i.mode & 0xF000) = 0x4000 GROUP BY d.inode HAVING count(*) > 1")):
            self.problem(f"directory inode {ino} has {n} names")
            if self.repair:
                self.db.change("DELETE FROM dentries WHERE inode=? AND id NOT IN (SELECT min(id) "
                               "FROM dentries WHERE inode=?)", (ino, ino))

    def _unnamed(self) -> None:
        rows = list(self.db.rows(
            "SELECT i.id, i.nlink, i.mode FROM inodes i LEFT JOIN dentries d ON d.inode = i.id "
            "WHERE d.id IS NULL AND i.id != ?", (ROOT_INODE,)))
        lost_found = None
        for ino, nlink, mode in rows:
            if nlink == 0:
                log.info("fsck: inode %d is an orphan (unlinked while open at the last stop)%s",
                         ino, "; freeing it" if self.repair else "")
                self.report.orphans.append(ino)
                if self.repair:
                    self._free(ino)
                continue
            self.problem(f"inode {ino} has {nlink} link(s) but no name")
            if self.repair:
                if lost_found is None:
                    lost_found = self._lost_found()
                self.db.change("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                               (lost_found, f"#{ino}".encode(), ino))
                if stat.S_ISDIR(mode):
                    self.db.change("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (lost_found,))

    def _lost_found(self) -> int:
        r = self.db.row("SELECT inode FROM dentries WHERE parent=? AND name=?",
                        (ROOT_INODE, LOST_FOUND))
        if r is not None:
            return r[0]
        now = time.time_ns()
        self.db.change("INSERT INTO inodes (mode, nlink, uid, gid, size, atime_ns, mtime_ns, "
                       "ctime_ns, btime_ns) VALUES (?, 2, 0, 0, 0, ?, ?, ?, ?)",
                       (stat.S_IFDIR | 0o700, now, now, now, now))
        ino = self.db.last_id()
        self.db.change("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                       (ROOT_INODE, LOST_FOUND, ino))
        self.db.change("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (ROOT_INODE,))
        return ino

    def _free(self, ino: int) -> None:
        self.db.change("DELETE FROM extents WHERE inode=?", (ino,))
        self.db.change("DELETE FROM inodes WHERE id=?", (ino,))  # trigger inodes_gone: the rest

    def _link_counts(self) -> None:
        for ino, mode, nlink, names, subdirs in list(self.db.rows(
                "SELECT i.id, i.mode, i.nlink, "
                "(SELECT count(*) FROM dentries d WHERE d.inode = i.id), "
                "(SELECT count(*) FROM dentries d JOIN inodes c ON c.id = d.inode "
                " WHERE d.parent = i.id AND (c.mode & 0xF000) = 0x4000) "
                "FROM inodes i WHERE i.nlink > 0")):
            want = 2 + subdirs if stat.S_ISDIR(mode) else names
            if nlink != want:
                self.problem(f"inode {ino}: link count {nlink}, should be {want}")
                if self.repair:
                    self.db.change("UPDATE inodes SET nlink=? WHERE id=?", (want, ino))

    def _ghosts(self) -> None:
        for ino, mode, state in list(self.db.rows(
                "SELECT g.inode, i.mode, g.state FROM ghosts g LEFT JOIN inodes i "
                "ON i.id = g.inode WHERE i.id IS NULL OR (i.mode & 0xF000) != 0x8000 "
                "OR g.state NOT IN ('ghost', 'hydrated', 'pinned')")):
            what = ("a missing inode" if mode is None else
                    "an inode that is not a regular file" if not stat.S_ISREG(mode) else
                    f"an unknown state {state!r}")
            self.problem(f"ghost record of inode {ino} is for {what}")
            if self.repair:
                self.db.change("DELETE FROM ghosts WHERE inode=?", (ino,))

    def _smart_folders(self) -> None:
        for ino, mode, entries in list(self.db.rows(
                "SELECT x.inode, i.mode, (SELECT count(*) FROM dentries d WHERE d.parent = "
                "x.inode) FROM xattrs x JOIN inodes i ON i.id = x.inode "
                "WHERE x.name = ?", (QUERY_XATTR,))):
            if not stat.S_ISDIR(mode) or entries:
                why = "not a directory" if not stat.S_ISDIR(mode) else f"{entries} entries"
                self.problem(f"smart folder inode {ino} has {why}; its query is dropped")
                if self.repair:
                    self.db.change("DELETE FROM xattrs WHERE inode=? AND name=?",
                                   (ino, QUERY_XATTR))

    def _extents(self) -> None:
        total = self.volume.capacity // SECTOR if self.volume is not None else None
        for ino, sector in list(self.db.rows(
                "SELECT e.inode, e.sector FROM extents e LEFT JOIN inodes i ON i.id = e.inode "
                "WHERE i.id IS NULL")):
            self.problem(f"extent at sector {sector} belongs to missing inode {ino}")
            self._drop_extent(ino, sector)
        damaged: set[int] = set()
        prev: tuple[int, int] = (-1, 0)  # (inode, end sector) of the previous extent
        for ino, sector, nsect, addr, csums, row_csum, size in list(self.db.rows(
                "SELECT e.inode, e.sector, e.nsect, e.addr, e.csums, e.row_csum, i.size "
                "FROM extents e JOIN inodes i ON i.id = e.inode ORDER BY e.inode, e.sector")):
            bad = None
            if nsect < 1 or sector < 0 or addr < 0 or \
                    sector // GROUP_SECTORS != (sector + nsect - 1) // GROUP_SECTORS:
                bad = f"has an impossible shape ({nsect} sectors at volume sector {addr})"
            elif (csums is None) == (row_csum is None) or \
                    (csums is not None and len(csums) != 8 * nsect) or \
                    (row_csum is not None and (sector % FORMAT2_BLOCK_SECTORS
                                              or nsect > FORMAT2_BLOCK_SECTORS)):
                bad = "has malformed checksums"
            elif sector * SECTOR >= size:
                bad = f"lies past the end of the file ({size} bytes)"
            elif prev[0] == ino and sector < prev[1]:
                bad = "overlaps the extent before it in the file"
            if bad is not None:
                self.problem(f"inode {ino}: extent at file sector {sector} {bad}")
                if not bad.startswith("lies past"):
                    damaged.add(ino)
                self._drop_extent(ino, sector)
                continue
            prev = (ino, sector + nsect)
        used = [(a, n, "extent", i, s) for i, s, a, n in self.db.rows(
            "SELECT inode, sector, addr, nsect FROM extents")]
        used += [(a, n, "copy", g, 0) for g, a, n in self.db.rows(
            "SELECT generation, addr, nsect FROM metacopy")]
        used.sort()
        end = RESERVED_SECTORS
        for addr, n, kind, ino, sector in used:
            bad = None
            if addr < end:
                bad = "overlaps another extent" if addr >= RESERVED_SECTORS else \
                    "lies in the reserved superblock area"
            elif total is not None and addr + n > total:
                bad = "lies past the end of the volume"
            if bad is None:
                end = addr + n
                continue
            if kind == "copy":
                self.problem(f"metadata copy {ino}: sectors {addr}+{n} {bad}")
                if self.repair:
                    self.db.change("DELETE FROM metacopy WHERE generation=? AND addr=?",
                                   (ino, addr))
                continue
            self.problem(f"inode {ino} extent at file sector {sector}: volume sectors "
                         f"{addr}+{n} {bad}")
            damaged.add(ino)
            self._drop_extent(ino, sector)
        self.report.damaged_files.extend(sorted(damaged))
        for ino, sectors, actual in list(self.db.rows(
                "SELECT i.id, i.sectors, coalesce((SELECT sum(nsect) FROM extents e "
                "WHERE e.inode = i.id), 0) FROM inodes i")):
            if sectors != actual:
                self.problem(f"inode {ino}: counts {sectors} stored sectors, has {actual}")
                if self.repair:
                    self.db.change("UPDATE inodes SET sectors=? WHERE id=?", (actual, ino))

    def _drop_extent(self, ino: int, sector: int) -> None:
        if self.repair:
            self.db.change("DELETE FROM extents WHERE inode=? AND sector=?", (ino, sector))

    def _verify(self, progress: Callable[[int, int], None] | None) -> None:
        rows = [(r[0], Extent(*r[1:])) for r in self.db.rows(
            "SELECT inode, sector, nsect, addr, csums, row_csum FROM extents ORDER BY addr")]
        total = sum(e.nsect for _i, e in rows) * SECTOR
        extents = ExtentMap(self.db, self.volume)
        done = 0
        damaged = set(self.report.damaged_files)
        for ino, e in rows:
            try:
                extents.read_run(ino, [e], e.sector, e.end)
            except (FSError, OSError) as exc:
                log.error("fsck: inode %d extent at file sector %d: %s", ino, e.sector, exc)
                self.problem(f"inode {ino} extent at file sector {e.sector}: content does not "
                             "match its checksums (overwritten or unreadable)")
                damaged.add(ino)
            done += e.nsect * SECTOR
            self.report.extents_verified += 1
            if progress is not None:
                progress(done, total)
        self.report.damaged_files = sorted(damaged)


def check(db: MetaDB, volume, repair: bool = False, verify_data: bool = False,
          progress: Callable[[int, int], None] | None = None) -> FsckReport:
    """Check (and with `repair`, mend) the filesystem in `db` on `volume`."""
    return Checker(db, volume, repair).run(verify_data, progress)


def paths_of(db: MetaDB, ino: int) -> list[str]:
    """The paths naming an inode (for reports)."""
    out = []
    for parent, name in db.rows("SELECT parent, name FROM dentries WHERE inode=?", (ino,)):
        parts = [bytes(name).decode(errors="replace")]
        seen = 0
        while parent != ROOT_INODE and seen < 4096:
            r = db.row("SELECT parent, name FROM dentries WHERE inode=?", (parent,))
            if r is None:
                parts.append("?")
                break
            parts.append(bytes(r[1]).decode(errors="replace"))
            parent = r[0]
            seen += 1
        out.append("/" + "/".join(reversed(parts)))
    return out
