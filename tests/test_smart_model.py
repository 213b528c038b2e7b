"""Model-based test of smart folders: random sequences of file changes on the mount (create,
grow and shrink, rename across directories, tag and untag, chmod, hard link, unlink, mkdir)
while four smart folders watch; after every step each folder must list exactly what a Python
model of its query says, with the clash names the filesystem promises, and every entry must be
the matching file itself (same inode, same size)."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from mountutil import scratch_mount

MIRROR_BIT = 1 << 48  # directories found by a query are shown with this bit set
DIRS = ["a", "b", "a/deep"]
NAMES = ["x.txt", "y.txt", "x.log", "notes", "X.TXT", "y.csv"]
SIZES = [0, 10, 1023, 1024, 5000, 70_000]
TAGS = [b"red", b"blue, red", b"Red", b"green", b""]


def tags_of(path: str) -> set[str]:
    try:
        raw = os.getxattr(path, "user.tags")
    except OSError:
        return set()
    return {t.strip().lower() for t in raw.decode().split(",") if t.strip()}


def shown_names(matches: list[tuple[int, str]]) -> set[str]:
    """The names a smart folder shows for (inode, name) matches: the lowest inode of a name
    keeps it, the others are `stem #INODE.ext`."""
    out: set[str] = set()
    for ino, name in sorted(matches):
        if name in out:
            stem, ext = os.path.splitext(name)
            if not stem:
                stem, ext = name, ""
            name = f"{stem} #{ino}{ext}"
        out.add(name)
    return out


QUERIES = {
    "texts": ("under:/m ext:txt",
              lambda p, st_, tags: p.lower().endswith(".txt") and len(os.path.basename(p)) > 4),
    "big": ("under:/m size>=1K type:file",
            lambda p, st_, tags: stat.S_ISREG(st_.st_mode) and st_.st_size >= 1024),
    "red": ("under:/m tag:red", lambda p, st_, tags: "red" in tags),
    "mixed": ("under:/m (name:x* OR NOT ext:txt) AND NOT type:dir AND NOT size=0",
              lambda p, st_, tags: not stat.S_ISDIR(st_.st_mode) and st_.st_size != 0
              and (os.path.basename(p).startswith("x")
                   or not (p.lower().endswith(".txt") and len(os.path.basename(p)) > 4))),
}


class SmartModel(RuleBasedStateMachine):
    """File changes under /m of the mount; the smart folders under /s must follow."""

    root = ""

    def __init__(self) -> None:
        super().__init__()
        self.m = os.path.join(self.root, "m")
        shutil.rmtree(self.m, ignore_errors=True)
        for d in DIRS:
            os.makedirs(os.path.join(self.m, d), exist_ok=True)

    def _p(self, d: str, name: str) -> str:
        return os.path.join(self.m, d, name)

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES), size=st.sampled_from(SIZES))
    def write(self, d, name, size):
        with open(self._p(d, name), "wb") as f:
            f.write(b"z" * size)

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES), size=st.sampled_from(SIZES))
    def truncate(self, d, name, size):
        if os.path.isfile(self._p(d, name)):
            os.truncate(self._p(d, name), size)

    @rule(d1=st.sampled_from(DIRS), n1=st.sampled_from(NAMES), d2=st.sampled_from(DIRS),
          n2=st.sampled_from(NAMES))
    def rename(self, d1, n1, d2, n2):
        if os.path.isfile(self._p(d1, n1)):
            os.rename(self._p(d1, n1), self._p(d2, n2))

    @rule(d1=st.sampled_from(DIRS), n1=st.sampled_from(NAMES), d2=st.sampled_from(DIRS),
          n2=st.sampled_from(NAMES))
    def link(self, d1, n1, d2, n2):
        if os.path.isfile(self._p(d1, n1)) and not os.path.lexists(self._p(d2, n2)):
            os.link(self._p(d1, n1), self._p(d2, n2))

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES), tags=st.sampled_from(TAGS))
    def tag(self, d, name, tags):
        if os.path.isfile(self._p(d, name)):
            if tags:
                os.setxattr(self._p(d, name), "user.tags", tags)
            elif "user.tags" in os.listxattr(self._p(d, name)):
                os.removexattr(self._p(d, name), "user.tags")

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES))
    def unlink(self, d, name):
        if os.path.isfile(self._p(d, name)):
            os.unlink(self._p(d, name))

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES), mode=st.sampled_from([0o600,
                                                                                      0o755]))
    def chmod(self, d, name, mode):
        if os.path.isfile(self._p(d, name)):
            os.chmod(self._p(d, name), mode)

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(["x.dir", "sub.txt"]))
    def mkdir(self, d, name):
        if not os.path.lexists(self._p(d, name)):
            os.mkdir(self._p(d, name))

    @invariant()
    def folders_match_the_model(self):
        paths: dict[int, list[str]] = {}  # every name of every inode
        stats: dict[int, os.stat_result] = {}
        for top, dirs, files in os.walk(self.m):
            for n in dirs + files:
                p = os.path.join(top, n)
                s = os.lstat(p)
                paths.setdefault(s.st_ino, []).append(p)
                stats[s.st_ino] = s
        for folder, (_query, pred) in QUERIES.items():
            # an inode matches when one of its names does; it is shown once
            matches = [(ino, os.path.basename(ps[0])) for ino, ps in paths.items()
                       if any(pred(p, stats[ino], tags_of(p)) for p in ps)]
            shown = os.path.join(self.root, "s", folder)
            listed = os.listdir(shown)
            inos = sorted(os.stat(os.path.join(shown, n)).st_ino & ~MIRROR_BIT for n in listed)
            assert inos == sorted(i for i, _n in matches), (folder, listed, matches)
            if all(len(paths[i]) == 1 for i, _n in matches):
                # (a file with several names is shown under one of them: any is right)
                assert set(listed) == shown_names(matches), (folder, listed, matches)
            for name in listed:
                st_ = os.stat(os.path.join(shown, name))
                ino = st_.st_ino & ~MIRROR_BIT
                if stat.S_ISREG(stats[ino].st_mode):
                    assert (st_.st_ino, st_.st_size) == (ino, stats[ino].st_size)


@pytest.fixture(scope="module")
def smart_mount():
    with scratch_mount("dwfs-smart-model-") as (m, _base):
        for folder, (query, _pred) in QUERIES.items():
            path = m.path("s", folder)
            os.makedirs(path)
            os.setxattr(path, "user.dwfs.query", query.encode())
        yield m
        m.umount()


@pytest.mark.timeout(600)
def test_smart_folders_follow_a_model(smart_mount):
    """DWFS_MODEL_EXAMPLES=300 in the environment searches longer."""
    SmartModel.root = smart_mount.mountpoint
    run_state_machine_as_test(
        SmartModel,
        settings=settings(max_examples=int(os.environ.get("DWFS_MODEL_EXAMPLES", "25")),
                          stateful_step_count=25, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck)),
    )
