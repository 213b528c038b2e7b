"""Model-based test of following a ghost source's changes (what `dwfs ghost import --watch`
sends the daemon), without a kernel: random changes to a real source tree (files written,
directories made, symbolic links made and re-pointed, names removed, renamed over others and
exchanged), reported as a watcher reports them, applied in batches; after every batch the
destination must mirror the source: the same names, kinds, sizes, times and link targets,
and every file reads back its source's bytes."""

from __future__ import annotations

import itertools
import os
import shutil
import stat

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import rule
from posixutil import RENAME_EXCHANGE, renameat2
from test_ghosts_model import GhostMachine, run_ghost_machine

from vfs.attrs import ROOT_INODE, Caller
from vfs.ghostimport import import_tree, sync_changes
from vfs.ghostsource import recorded_mtime
from vfs.view import View

ROOT = Caller(0, 0)
PATHS = ["a", "b", "d", "e", "d/a", "d/b", "d/f", "e/a", "e/f", "d/f/a"]
TARGETS = ["a", "../b", "nowhere", "d/a"]
SIZES = [0, 5, 4096, 70_000]


def mirror_of_source(root: str) -> dict[str, tuple]:
    """What the destination must show of a source tree: path -> (kind, size, mtime, target)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(top, n)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", st_.st_size, recorded_mtime(st_), None)
            elif stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", None, None, os.readlink(p))
            else:
                out[rel] = ("dir", None, None, None)
    return out


def mirror_of_dest(view: View, ino: int, prefix: str = "") -> dict[str, tuple]:
    """The same for a directory of the filesystem."""
    out = {}
    for name in view.fs.listdir(ino):
        a = view.fs.find(ino, name)
        rel = prefix + name.decode()
        if stat.S_ISREG(a.mode):
            out[rel] = ("file", a.size, a.mtime_ns, None)
        elif stat.S_ISLNK(a.mode):
            out[rel] = ("link", None, None, view.fs.readlink(a.ino).decode())
        else:
            out[rel] = ("dir", None, None, None)
            out.update(mirror_of_dest(view, a.ino, rel + "/"))
    return out


class SyncModel(GhostMachine):
    """A source tree, its ghosts in a destination directory, and the watcher's reports."""

    def __init__(self) -> None:
        super().__init__()
        n = self.n
        for d in ("d", "d/f", "e"):  # a start with directories of different entries
            os.mkdir(self._p(d))
        for f in ("a", "d/a", "d/b", "d/f/a", "e/f"):
            with open(self._p(f), "wb") as out:
                out.write(f.encode())
        os.symlink("a", self._p("b"))
        self.dest = self.view.fs.mkdir(ROOT_INODE, f"dest{n}".encode(), 0o755, ROOT).ino
        import_tree(self.view.fs, self.view.ghosts, self.dest, self.src, ROOT)
        self.pending: list[list[str]] = []
        self.data = itertools.count()

    def _p(self, rel: str) -> str:
        return os.path.join(self.src, rel)

    def _parent_is_dir(self, rel: str) -> bool:
        """Whether `rel`'s parent is a directory reached through no link (a watcher reports
        a change at the directory it happened in, never at a path through a link)."""
        parent = os.path.dirname(rel)
        while parent:
            if os.path.islink(self._p(parent)) or not os.path.isdir(self._p(parent)):
                return False
            parent = os.path.dirname(parent)
        return True

    @rule(rel=st.sampled_from(PATHS), size=st.sampled_from(SIZES))
    def write_file(self, rel, size):
        p = self._p(rel)
        if not self._parent_is_dir(rel) or os.path.isdir(p) or os.path.islink(p):
            return
        with open(p, "wb") as f:
            f.write(bytes([next(self.data) % 251]) * size)
        self.pending.append(["changed", rel])

    @rule(rel=st.sampled_from(PATHS))
    def make_dir(self, rel):
        if self._parent_is_dir(rel) and not os.path.lexists(self._p(rel)):
            os.mkdir(self._p(rel))
            self.pending.append(["changed", rel])

    @rule(rel=st.sampled_from(PATHS), to=st.sampled_from(TARGETS))
    def point_link(self, rel, to):
        p = self._p(rel)
        if not self._parent_is_dir(rel) or (os.path.lexists(p) and not os.path.islink(p)):
            return
        if os.path.islink(p):
            os.unlink(p)
            self.pending.append(["changed", rel])
        os.symlink(to, p)
        self.pending.append(["changed", rel])

    @rule(rel=st.sampled_from(PATHS))
    def remove(self, rel):
        p = self._p(rel)
        if not self._parent_is_dir(rel) or not os.path.lexists(p):
            return
        if os.path.isdir(p) and not os.path.islink(p):
            gone = [os.path.relpath(os.path.join(top, n), self.src)
                    for top, dirs, files in os.walk(p, topdown=False) for n in files + dirs]
            shutil.rmtree(p)
            self.pending += [["changed", g] for g in gone] + [["changed", rel]]
        else:
            os.unlink(p)
            self.pending.append(["changed", rel])

    @rule(old=st.sampled_from(PATHS), new=st.sampled_from(PATHS),
          exchange=st.booleans())
    def rename(self, old, new, exchange):
        if not (self._parent_is_dir(old) and self._parent_is_dir(new)):
            return
        try:
            if exchange:
                renameat2(self._p(old), self._p(new), RENAME_EXCHANGE)
            else:
                os.rename(self._p(old), self._p(new))
        except OSError:
            return  # refused: nothing changed, nothing is reported
        self.pending.append(["moved", old, new])
        if exchange:
            self.pending.append(["moved", new, old])

    @rule()
    def sync(self):
        sync_changes(self.view.fs, self.view.ghosts, self.dest, self.src, ROOT, self.pending)
        self.pending = []
        want, got = mirror_of_source(self.src), mirror_of_dest(self.view, self.dest)
        assert got == want
        for rel, (kind, _size, _mtime, _target) in want.items():
            if kind == "file":
                ino = self.dest
                for part in rel.split("/"):
                    ino = self.view.fs.find(ino, part.encode()).ino
                with open(self._p(rel), "rb") as f:
                    expected = f.read()
                assert bytes(self.view.read(ino, 0, len(expected) + 1)) == expected

    def teardown(self):
        self.view.fs.commit()


@pytest.mark.timeout(600)
def test_ghosts_follow_a_changing_source(tmp_path):
    """DWFS_MODEL_EXAMPLES=300 in the environment searches longer."""
    run_ghost_machine(SyncModel, tmp_path, 40, 25)
