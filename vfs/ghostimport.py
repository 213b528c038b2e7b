"""Importing a source tree as ghosts, and keeping the ghosts in step with later changes.

The source is walked first (outside the filesystem's lock), then applied in batches, each
all-or-nothing. New names go in with bulk inserts; names that already exist are merged: a
directory is entered, a ghost of a changed source is refreshed (its stored content dropped),
anything else is left alone and counted as a conflict. Directories become real directories and
symbolic links real links; other special files are skipped. An interrupted import leaves the
batches done so far; running it again completes it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from vfs.attrs import NAME_MAX, Attr, Caller, clamp_time
from vfs.errors import FSError
from vfs.fs import Filesystem
from vfs.ghosts import GHOST, HYDRATED, PINNED, Ghosts
from vfs.ghostsource import recorded_mtime
from vfs.inodeflags import IMMUTABLE
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

BATCH = 2000
REPLACED = object()  # _merge's answer: the old entry is gone, make the new one


@dataclass(slots=True)
class SourceEntry:
    """One file, directory or link found in the source: where it goes and its stat."""

    parent: int  # index of the parent directory in the walk (-1: the import's destination)
    name: bytes
    st: os.stat_result
    path: bytes
    target: bytes | None = None


@dataclass
class ImportReport:
    """What an import or a sync did."""

    ghosts: int = 0
    directories: int = 0
    links: int = 0
    refreshed: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[str] = field(default_factory=list)
    # names added or changed in directories the kernel may have cached, and inodes whose
    # content changed: the adapter invalidates them
    touched_names: list[tuple[int, bytes]] = field(default_factory=list)
    touched_inodes: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        """A JSON-able summary."""
        return {"ghosts": self.ghosts, "directories": self.directories, "links": self.links,
                "refreshed": self.refreshed, "unchanged": self.unchanged,
                "removed": self.removed, "skipped": self.skipped[:50],
                "skipped_count": len(self.skipped)}


def walk_iter(source: str, report: ImportReport) -> Iterator[SourceEntry]:
    """Every entry under `source`, directories before their contents; an entry's `parent` is
    the position of its directory in this sequence (-1 for `source` itself)."""
    root = os.fsencode(os.path.abspath(source))
    stack: list[tuple[int, bytes]] = [(-1, root)]
    count = 0
    while stack:
        parent, path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError as exc:
            report.skipped.append(f"{os.fsdecode(path)}: {exc.strerror}")
            log.warning("ghost import: cannot list %s: %s", os.fsdecode(path), exc.strerror)
            continue
        with it:
            for de in it:
                try:
                    st = de.stat(follow_symlinks=False)
                    target = os.readlink(de.path) if stat.S_ISLNK(st.st_mode) else None
                except OSError as exc:
                    report.skipped.append(f"{os.fsdecode(de.path)}: {exc.strerror}")
                    log.warning("ghost import: cannot stat %s: %s", os.fsdecode(de.path),
                                exc.strerror)
                    continue
                yield SourceEntry(parent, de.name, st, de.path, target)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((count, de.path))
                count += 1


def walk(source: str, report: ImportReport) -> list[SourceEntry]:
    """Every entry under `source` (see `walk_iter`)."""
    return list(walk_iter(source, report))


def batches(entries: Iterable[SourceEntry], size: int = BATCH) -> Iterator[list[SourceEntry]]:
    """`entries` in lists of `size`."""
    batch: list[SourceEntry] = []
    for e in entries:
        batch.append(e)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Importer:
    """Applies walked source entries under a destination directory of a filesystem."""

    def __init__(self, fs: Filesystem, ghosts: Ghosts, caller: Caller) -> None:
        self.fs = fs
        self.db = fs.db
        self.ghosts = ghosts
        self.caller = caller
        self.deferred: list[tuple[int, bytes, os.stat_result]] = []

    def _owner(self, st: os.stat_result) -> tuple[int, int]:
        if self.caller.uid == 0:
            return st.st_uid, st.st_gid
        return self.caller.uid, self.caller.gid

    def run(self, dest: int, entries: Iterable[list[SourceEntry]], report: ImportReport,
            progress: Callable[[int, int | None], None] | None = None) -> None:
        """Apply batches of entries (from `walk_iter`, in order) under directory `dest`."""
        dest_of: dict[int, int | None] = {-1: dest}  # walk position -> directory inode
        fresh: set[int] = set()  # directories made by this import: no name checks needed
        start = 0
        for batch in entries:
            self.fs.atomically(self._apply, batch, start, dest_of, fresh, report)
            start += len(batch)
            if progress is not None:
                progress(start, None)
        self.refresh_deferred(report)

    def _apply(self, batch: list[SourceEntry], start: int, dest_of: dict[int, int | None],
               fresh: set[int], report: ImportReport) -> None:
        self.fs.check_metadata_room()
        now = time.time_ns()
        next_ino = self.db.value("SELECT seq FROM sqlite_sequence WHERE name='inodes'", (), 1) + 1
        inodes: list[tuple] = []
        dentries: list[tuple] = []
        ghosts: list[tuple] = []
        links: dict[int, int] = {}
        owned_links: list[tuple[int]] = []
        flags: dict[int, int] = {}  # new inode -> the flags it inherits (no-dump, no-atime)
        for k, e in enumerate(batch):
            index = start + k
            parent = dest_of.get(e.parent)
            if parent is None:  # its directory was skipped
                dest_of[index] = None
                continue
            if len(e.name) > NAME_MAX:
                report.skipped.append(f"{os.fsdecode(e.path)}: name longer than {NAME_MAX}")
                dest_of[index] = None
                continue
            mode = e.st.st_mode
            kind = stat.S_IFMT(mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                report.skipped.append(f"{os.fsdecode(e.path)}: not a file, directory or link")
                dest_of[index] = None
                continue
            if parent not in fresh:
                existing = self.fs.find(parent, e.name)
                if self._left_as_it_is(parent, existing, e, report):
                    dest_of[index] = None
                    continue
                if existing is not None:
                    merged = self._merge(parent, e, existing.ino, existing.mode, report)
                    if merged is not REPLACED:
                        dest_of[index] = merged
                        continue
                report.touched_names.append((parent, e.name))
            ino = next_ino
            next_ino += 1
            uid, gid = self._owner(e.st)
            is_dir = kind == stat.S_IFDIR
            size = 0 if is_dir else (len(e.target) if e.target is not None else e.st.st_size)
            inodes.append((ino, mode, 2 if is_dir else 1, uid, gid, size,
                           clamp_time(e.st.st_atime_ns), recorded_mtime(e.st), now, now,
                           e.target))
            dentries.append((parent, e.name, ino))
            inherited = flags.get(parent) or self.fs.inherited_flags(parent)
            if inherited:
                flags[ino] = inherited
            if is_dir:
                links[parent] = links.get(parent, 0) + 1
                dest_of[index] = ino
                fresh.add(ino)
                report.directories += 1
            elif kind == stat.S_IFLNK:
                owned_links.append((ino,))
                report.links += 1
            else:  # an empty file has nothing to fetch: it is hydrated from the start
                ghosts.append((ino, e.path, e.st.st_size, recorded_mtime(e.st),
                               GHOST if e.st.st_size else HYDRATED,
                               None if e.st.st_size else b""))
                report.ghosts += 1
        self.db.changemany(
            "INSERT INTO inodes (id, mode, nlink, uid, gid, size, atime_ns, mtime_ns, "
            "ctime_ns, btime_ns, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inodes)
        self.db.changemany("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                           dentries)
        self.db.changemany("INSERT INTO ghosts (inode, source, size, mtime_ns, state, hashes) "
                           "VALUES (?, ?, ?, ?, ?, ?)", ghosts)
        self.db.changemany("INSERT INTO ghost_links (inode) VALUES (?)", owned_links)
        self.db.changemany("INSERT INTO inode_flags (inode, flags) VALUES (?, ?)",
                           list(flags.items()))
        for parent, n in links.items():
            self.db.change("UPDATE inodes SET nlink=nlink+? WHERE id=?", (n, parent))
        touched_parents = {p for p, _n, _i in dentries if p not in fresh}
        for parent in touched_parents:
            self.db.change("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?",
                           (now, now, parent))
            report.touched_inodes.append(parent)
        for g in ghosts:
            self.ghosts.added(g[0], g[4])
        self.fs.inode_flags.update(flags)  # last: nothing above is undone after this

    def _left_as_it_is(self, parent: int, existing: Attr | None, e: SourceEntry,
                       report: ImportReport) -> bool:
        """True (and reported as skipped) where chattr's flags keep the destination as it
        is: a new name in an immutable directory, or an existing immutable or append-only
        entry (a directory of them is not entered)."""
        if existing is None and self.fs.fixed_flags(parent) & IMMUTABLE:
            why = "its directory in the mount is immutable"
        elif existing is not None and self.fs.fixed_flags(existing.ino):
            why = "it is immutable or append-only in the mount"
        else:
            return False
        report.skipped.append(f"{os.fsdecode(e.path)}: {why}")
        return True

    def _merge(self, parent: int, e: SourceEntry, ino: int, mode: int,
               report: ImportReport) -> int | None | object:
        """An entry whose name exists at the destination; returns the directory to fill, or
        REPLACED when what the import made there was removed for the entry to be made anew
        (the source's kind or link target changed)."""
        kind = stat.S_IFMT(e.st.st_mode)
        if kind == stat.S_IFDIR and stat.S_ISDIR(mode):
            return ino
        state = self.ghosts.state(ino)
        if kind == stat.S_IFLNK and stat.S_ISLNK(mode) and self.fs.readlink(ino) == e.target:
            report.unchanged += 1
            return None
        if kind != stat.S_IFMT(mode) or kind == stat.S_IFLNK:  # (a link: its target changed)
            if (state not in (None, PINNED) or stat.S_ISDIR(mode)
                    or owns_link(self.db, ino, mode)):
                remove_ghost_path(self.fs, self.ghosts, parent, e.name, report)
                if self.fs.find(parent, e.name) is None:
                    return REPLACED
        if kind == stat.S_IFREG and state is not None:
            rec = self.ghosts.record(ino)
            if (rec.source.encode(errors="surrogateescape") == e.path
                    and rec.size == e.st.st_size
                    and rec.mtime_ns == recorded_mtime(e.st)):
                report.unchanged += 1
            elif ino in self.ghosts.fetches:
                self.deferred.append((ino, e.path, e.st))  # after its fetch has ended
            else:
                self.refresh(ino, e.path, e.st, report)
            return None
        report.skipped.append(f"{os.fsdecode(e.path)}: the destination already holds a "
                              "different file of that name")
        log.warning("ghost import: %s exists at the destination (inode %d) and is not its "
                    "ghost; left alone", os.fsdecode(e.path), ino)
        return None

    def refresh_deferred(self, report: ImportReport) -> None:
        """Refresh the ghosts whose source changed while they were being fetched, once each
        fetch has ended (waiting for it under the filesystem's lock would stop its stores)."""
        for ino, path, st in self.deferred:
            while True:
                fetch = self.ghosts.fetches.get(ino)
                if fetch is not None:
                    fetch.wait_done()
                if self.fs.atomically(self._refresh_if_idle, ino, path, st, report):
                    break
        self.deferred.clear()

    def _refresh_if_idle(self, ino: int, path: bytes, st: os.stat_result,
                         report: ImportReport) -> bool:
        if ino in self.ghosts.fetches:
            return False  # another read started a fetch meanwhile: wait for that one too
        if self.ghosts.state(ino) is not None and self.fs.exists(ino):
            self.refresh(ino, path, st, report)
        return True

    def refresh(self, ino: int, path: bytes, st: os.stat_result, report: ImportReport) -> None:
        """Point a ghost at a changed source: new size, times and mode; content dropped.
        Not while it is being fetched (see `refresh_deferred`)."""
        self.fs.drop_content(ino)
        state = GHOST if st.st_size else HYDRATED
        self.db.change("UPDATE ghosts SET source=?, size=?, mtime_ns=?, hashes=?, state=? "
                       "WHERE inode=?", (path, st.st_size, recorded_mtime(st),
                                         None if st.st_size else b"", state, ino))
        self.db.change("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=?, mode=? WHERE id=?",
                       (st.st_size, recorded_mtime(st), time.time_ns(),
                        stat.S_IFREG | stat.S_IMODE(st.st_mode), ino))
        self.ghosts.added(ino, state)
        report.refreshed += 1
        report.touched_inodes.append(ino)
        log.info("ghost inode %d: source %s changed; refreshed", ino, os.fsdecode(path))


def import_tree(fs: Filesystem, ghosts: Ghosts, dest: int, source: str, caller: Caller,
                progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Give directory inode `dest` a ghost of every file under host directory `source`."""
    if not os.path.isdir(source):
        raise FSError(errno.ENOTDIR, f"ghost import: source {source} is not a directory")
    fs.find(dest, b".")  # the destination exists and is a directory
    report = ImportReport()
    # The walk takes turns with storing what it found, batch by batch: a walking thread
    # beside the storing one would fight it for the interpreter (an import of 10,000 warm
    # files took 290 ms that way, against 190 ms in turns), and batches bound the memory.
    ghosts.imports += 1
    try:
        Importer(fs, ghosts, caller).run(dest, batches(walk_iter(source, report)), report,
                                         progress)
    finally:
        ghosts.imports -= 1
    log.info("ghost import of %s into inode %d: %s", source, dest, report.summary())
    return report


def owns_link(db: MetaDB, ino: int, mode: int) -> bool:
    """True for a symbolic link an import made (it follows its source)."""
    return stat.S_ISLNK(mode) and db.value(
        "SELECT 1 FROM ghost_links WHERE inode=?", (ino,), None) is not None


def remove_ghost_path(fs: Filesystem, ghosts: Ghosts, parent: int, name: bytes,
                      report: ImportReport) -> None:
    """The source of `name` in `parent` is gone: remove its ghost or the link an import made
    (a pinned file stays, as an ordinary file), or, for a directory, those under it and then
    it if it is left empty."""
    attr = fs.find(parent, name)
    if attr is None:
        return
    if fs.fixed_flags(parent) or fs.fixed_flags(attr.ino):
        report.skipped.append(f"{os.fsdecode(name)} in inode {parent}: its source is gone, "
                              "but chattr's flags keep it")
        return
    if stat.S_ISDIR(attr.mode):
        for e in fs.listdir(attr.ino):
            remove_ghost_path(fs, ghosts, attr.ino, e, report)
        if not fs.has_entries(attr.ino):
            fs.rmdir(parent, name)
            report.removed += 1
            report.touched_names.append((parent, name))
        return
    state = ghosts.state(attr.ino)
    if state is None and not owns_link(fs.db, attr.ino, attr.mode):
        return  # an ordinary file, or a link made in the mount: not ours to remove
    if state == PINNED:
        fs.db.change("DELETE FROM ghosts WHERE inode=?", (attr.ino,))
        ghosts.forget(attr.ino)
        log.info("ghost inode %d: source removed; kept as an ordinary file (pinned)", attr.ino)
        return
    fs.unlink(parent, name)
    ghosts.forget(attr.ino)
    report.removed += 1
    report.touched_names.append((parent, name))


def _prune(fs: Filesystem, ghosts: Ghosts, ino: int, src_dir: bytes,
           report: ImportReport) -> None:
    """Remove what imports made under directory `ino` whose source under `src_dir` is gone
    (a directory exchanged with another keeps only its own entries)."""
    for name in fs.listdir(ino):
        path = os.path.join(src_dir, name)
        attr = fs.find(ino, name)
        if attr is None:
            continue
        if not os.path.lexists(path):
            remove_ghost_path(fs, ghosts, ino, name, report)
        elif stat.S_ISDIR(attr.mode) and os.path.isdir(path) and not os.path.islink(path):
            _prune(fs, ghosts, attr.ino, path, report)


def _entries_for(root: bytes, rel: bytes, report: ImportReport) -> list[SourceEntry]:
    """Walk entries for one changed source path: its ancestors below the root, itself and,
    for a directory, everything under it."""
    parts = [p for p in rel.split(b"/") if p]
    entries: list[SourceEntry] = []
    path = root
    for part in parts:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            report.skipped.append(f"{os.fsdecode(path)}: {exc.strerror}")
            return entries[:0]
        entries.append(SourceEntry(len(entries) - 1, part, st, path, target))
    if entries and stat.S_ISDIR(entries[-1].st.st_mode):
        below = walk(os.fsdecode(path), report)
        base = len(entries)
        for e in below:
            e.parent = base - 1 if e.parent == -1 else e.parent + base
        entries += below
    return entries


def _dest_parent(fs: Filesystem, dest: int, rel: bytes) -> tuple[int | None, bytes]:
    """The destination directory of a source path's parent (None if missing) and its name."""
    parts = [p for p in rel.split(b"/") if p]
    ino: int | None = dest
    for part in parts[:-1]:
        attr = fs.find(ino, part)
        if attr is None or not stat.S_ISDIR(attr.mode):
            return None, parts[-1]
        ino = attr.ino
    return ino, parts[-1] if parts else b""


def sync_changes(fs: Filesystem, ghosts: Ghosts, dest: int, source: str, caller: Caller,
                 changes: list[list[str]]) -> ImportReport:
    """Apply source changes seen by a watcher: `["changed", rel]`, `["moved", old, new]`
    (paths relative to the source root)."""
    root = os.fsencode(os.path.abspath(source))
    report = ImportReport()
    importer = Importer(fs, ghosts, caller)
    for change in changes:
        kind, rel = change[0], os.fsencode(change[1])
        if kind == "moved":
            new = os.fsencode(change[2])
            # Moved as a whole only when the old name is gone from the source: after an
            # exchange (or a re-creation) both names are brought in step instead.
            with fs.lock:
                moved = (rel != new and not os.path.lexists(os.path.join(root, rel))
                         and _move(fs, ghosts, dest, root, rel, new, report))
            rel = new if moved else rel
            if not moved:
                _sync_one(fs, ghosts, importer, dest, root, rel, report)
                rel = new
        elif kind != "changed":
            raise ValueError(f"unknown change {kind!r}")
        _sync_one(fs, ghosts, importer, dest, root, rel, report)
    return report


def _sync_one(fs: Filesystem, ghosts: Ghosts, importer: Importer, dest: int, root: bytes,
              rel: bytes, report: ImportReport) -> None:
    """Bring the destination of one source path in step with the source as it is now."""
    path = os.path.join(root, rel)
    if os.path.lexists(path):
        entries = _entries_for(root, rel, report)
        if entries:
            importer.run(dest, batches(entries), report)
        if os.path.isdir(path) and not os.path.islink(path):
            with fs.lock:
                parent, name = _dest_parent(fs, dest, rel)  # (rel "." names `dest` itself)
                attr = fs.find(parent, name) if parent is not None and name else None
                if attr is not None and stat.S_ISDIR(attr.mode):
                    fs.atomically(_prune, fs, ghosts, attr.ino, path, report)
        return
    with fs.lock:
        parent, name = _dest_parent(fs, dest, rel)
        if parent is not None and name:
            fs.atomically(remove_ghost_path, fs, ghosts, parent, name, report)


def _move(fs: Filesystem, ghosts: Ghosts, dest: int, root: bytes, old: bytes, new: bytes,
          report: ImportReport) -> bool:
    """Rename the ghost (or directory) of a moved source; False if there is none to move,
    the new place's directory does not exist yet, or chattr's flags forbid the rename (the
    two places are then brought in step one by one)."""
    old_parent, old_name = _dest_parent(fs, dest, old)
    new_parent, new_name = _dest_parent(fs, dest, new)
    if old_parent is None or new_parent is None or not old_name or not new_name:
        return False
    attr = fs.find(old_parent, old_name)
    if attr is None:
        return False
    if not stat.S_ISDIR(attr.mode) and ghosts.state(attr.ino) is None:
        return False  # an ordinary file: leave it where it is
    if (fs.fixed_flags(old_parent) or fs.fixed_flags(attr.ino)
            or fs.fixed_flags(new_parent) & IMMUTABLE):
        return False
    if fs.find(new_parent, new_name) is not None:
        remove_ghost_path(fs, ghosts, new_parent, new_name, report)
        if fs.find(new_parent, new_name) is not None:
            return False
    old_src, new_src = os.path.join(root, old), os.path.join(root, new)

    def rename() -> None:
        fs.rename(old_parent, old_name, new_parent, new_name)
        fs.db.change("UPDATE ghosts SET source=? WHERE source=?", (new_src, old_src))
        fs.db.change("UPDATE ghosts SET source=CAST(? || substr(source, ?) AS BLOB) "
                     "WHERE substr(source, 1, ?) = ?",
                     (new_src + b"/", len(old_src) + 2, len(old_src) + 1, old_src + b"/"))

    fs.atomically(rename)
    report.touched_names += [(old_parent, old_name), (new_parent, new_name)]
    return True
