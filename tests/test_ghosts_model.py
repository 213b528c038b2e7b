"""Model-based test of ghost files in vfs (no kernel): random sequences of source changes,
re-imports, reads, writes, dehydrate/pin/unpin, checked after every step against a model of
what each file must hold, its state and the errno of every refused change."""

from __future__ import annotations

import errno
import itertools
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from test_vfs_unit import Env

from vfs.attrs import ROOT_INODE, Caller
from vfs.errors import FSError
from vfs.ghostimport import import_tree
from vfs.view import View
from vfs.xattrnames import STATE_XATTR

ROOT = Caller(0, 0)
FILES = ["f0", "f1", "f2"]
SIZES = [0, 1, 4096, 70_000, 1_100_000]
_run = itertools.count()


class GhostMachine(RuleBasedStateMachine):
    """A state machine over a filesystem (`env`, `view`: set by run_ghost_machine) with a
    new source directory `src` for each run, numbered `n`."""

    env: Env
    view: View
    base = ""

    def __init__(self) -> None:
        super().__init__()
        self.n = next(_run)
        self.src = os.path.join(self.base, f"src{self.n}")
        os.makedirs(self.src)


class GhostModel(GhostMachine):
    """Three files imported as ghosts; the model says what each must read back."""

    def __init__(self) -> None:
        super().__init__()
        n = self.n
        self.source: dict[str, bytes] = {}
        self.mtime: dict[str, int] = {}  # each source's modification time
        self.tick = 10**18 + n * 10**12  # source mtimes: each change a new one
        for f in FILES:
            self._write_source(f, os.urandom(5000))
        self.dest = self.env.fs.mkdir(ROOT_INODE, f"g{n}".encode(), 0o755, ROOT).ino
        import_tree(self.env.fs, self.view.ghosts, self.dest, self.src, ROOT)
        self.content = dict(self.source)  # what each file holds (imported or written)
        self.state: dict[str, str | None] = {
            f: "ghost" if self.source[f] else "hydrated" for f in FILES}
        self.imported = dict(self.source)  # the source content each ghost was imported as
        self.imported_mtime = dict(self.mtime)  # and the modification time it had then

    def _write_source(self, f: str, data: bytes) -> None:
        p = os.path.join(self.src, f)
        with open(p, "wb") as fh:
            fh.write(data)
        self.tick += 10**9
        os.utime(p, ns=(self.tick, self.tick))
        self.source[f] = data
        self.mtime[f] = self.tick

    def _ino(self, f: str) -> int:
        return self.view.lookup(self.dest, f.encode()).ino

    def _source_same(self, f: str) -> bool:
        # A ghost is checked against its source by size, modification time and content: a
        # source rewritten with the same bytes (an empty file, say) has still changed.
        return (self.source[f] == self.imported[f] and self.mtime[f] == self.imported_mtime[f]
                and self.state[f] is not None)

    def _expect(self, fn, *args, err: int | None = None):
        if err is None:
            return fn(*args)
        with pytest.raises(FSError) as info:
            fn(*args)
        assert info.value.errno == err, (fn.__name__, args, info.value)
        return None

    @rule(f=st.sampled_from(FILES), size=st.sampled_from(SIZES))
    def change_source(self, f, size):
        self._write_source(f, os.urandom(size))

    @rule()
    def reimport(self):
        import_tree(self.env.fs, self.view.ghosts, self.dest, self.src, ROOT)
        for f in FILES:
            if self.state[f] is not None and not self._source_same(f):
                self.imported[f] = self.content[f] = self.source[f]
                self.imported_mtime[f] = self.mtime[f]
                self.state[f] = "ghost" if self.source[f] else "hydrated"

    @rule(f=st.sampled_from(FILES), off=st.sampled_from([0, 5, 65536, 1_000_000]))
    def read(self, f, off):
        ino = self._ino(f)
        if self.state[f] == "ghost" and not self._source_same(f):
            self._expect(self.view.read, ino, off, 100_000, err=errno.EIO)
            return
        got = bytes(self.view.read(ino, off, 100_000))
        assert got == self.content[f][off:off + 100_000]
        if self.state[f] == "ghost":
            self.view.ghosts.hydrate(ino)  # let the fetch finish storing
            self.state[f] = "hydrated"

    @rule(f=st.sampled_from(FILES), off=st.sampled_from([0, 3, 70_000]))
    def write(self, f, off):
        ino = self._ino(f)
        if self.state[f] == "ghost" and not self._source_same(f):
            self._expect(self.view.write, ino, off, b"W", err=errno.EIO)
            return
        self.view.write(ino, off, b"W")
        c = self.content[f]
        c = c + bytes(max(0, off - len(c)))
        self.content[f] = c[:off] + b"W" + c[off + 1:]
        self.state[f] = None  # an ordinary file now

    @rule(f=st.sampled_from(FILES), want=st.sampled_from(["ghost", "hydrated", "pinned"]))
    def set_state(self, f, want):
        ino = self._ino(f)
        s = self.state[f]
        set_ = self.view.setxattr
        if s is None:
            self._expect(set_, ino, STATE_XATTR, want.encode(), err=errno.EOPNOTSUPP)
        elif want == "ghost":
            if s == "pinned":
                self._expect(set_, ino, STATE_XATTR, b"ghost", err=errno.EPERM)
            elif s == "hydrated" and not self._source_same(f):
                self._expect(set_, ino, STATE_XATTR, b"ghost", err=errno.EIO)
            else:
                set_(ino, STATE_XATTR, b"ghost")
                self.state[f] = "ghost"
        elif s == "ghost" and not self._source_same(f):
            self._expect(set_, ino, STATE_XATTR, want.encode(), err=errno.EIO)
        else:
            set_(ino, STATE_XATTR, want.encode())
            self.state[f] = want

    @invariant()
    def files_match_the_model(self):
        for f in FILES:
            ino = self._ino(f)
            attr = self.env.fs.getattr(ino)
            assert attr.size == len(self.content[f]), f
            state = self.view.ghosts.state(ino)
            assert state == self.state[f], (f, state, self.state[f])
            if state == "ghost":
                assert attr.blocks == 0, f
            else:
                assert bytes(self.view.read(ino, 0, 2_000_000)) == self.content[f], f

    def teardown(self):
        self.env.fs.commit()


def run_ghost_machine(machine, tmp_path, examples: int, steps: int) -> None:
    """Run a state machine of ghosts on a new filesystem (machine.env, .view and .base set);
    DWFS_MODEL_EXAMPLES in the environment overrides `examples`."""
    env = Env(tmp_path / "fs", rows=2048)
    machine.env = env
    machine.view = View(env.fs)
    machine.base = str(tmp_path / "sources")
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=int(os.environ.get("DWFS_MODEL_EXAMPLES", examples)),
                              stateful_step_count=steps, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck)),
        )
    finally:
        machine.view.ghosts.close()
        env.close()


@pytest.mark.timeout(600)
def test_ghosts_follow_a_model(tmp_path):
    """DWFS_MODEL_EXAMPLES=300 in the environment searches longer."""
    run_ghost_machine(GhostModel, tmp_path, 30, 20)
