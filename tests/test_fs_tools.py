"""Ordinary tools on a mounted dwfs filesystem: cp, rsync, tar, git, SQLite, find, du, df.

All tests share one mount of a raidz2 warehouse of five 64 MiB members; each works in its own
directory. Trees copied onto the mount are compared with `diff -r` and with listings of type,
mode, size, link count and mtime.
"""

from __future__ import annotations

import email
import os
import shutil
import sqlite3
import subprocess
from contextlib import closing

import pytest
from mountutil import mounted_warehouse, status

from vfs.alloc import SECTOR
from vfs.fs import RESERVED_SECTORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def need(tool: str) -> str:
    """The path of a tool the tests need; a clear failure (not a skip) when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not installed: run scripts/setup (it installs rsync, git and "
                    "sqlite3) or apt-get install it")
    return path


def sh(*args: str, cwd: str | None = None, env: dict | None = None) -> str:
    """Run a tool; fail with its output if it fails."""
    p = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}: {p.stderr}{p.stdout}"
    return p.stdout


def listing(top: str) -> list[str]:
    """Type, mode, size (files), link count (files) and mtime of everything under `top`."""
    out = sh("find", ".", "-printf", "%y %m %P %n %s %T@ %l\n", cwd=top).splitlines()
    rows = []
    for line in out:
        kind, mode, rest = line.split(" ", 2)
        if kind == "d":  # directory sizes and link counts are the filesystem's own
            rest = rest.split(" ")[0]
        rows.append(f"{kind} {mode} {rest}")
    return sorted(rows)


@pytest.fixture(scope="module")
def fsm(tmp_path_factory):
    """One mounted filesystem for the whole module."""
    with mounted_warehouse(tmp_path_factory.mktemp("tools")) as m:
        yield m


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A real source tree on the host: this repository's raid/ and the stdlib's email package,
    plus a symlink, a hard link, an executable, an empty directory and an empty file."""
    top = tmp_path_factory.mktemp("src") / "tree"
    top.mkdir()
    shutil.copytree(os.path.join(ROOT, "raid"), top / "raid", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.dirname(email.__file__), top / "email",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (top / "empty").mkdir()
    (top / "empty-file").write_bytes(b"")
    (top / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(top / "tool.sh", 0o751)
    os.symlink("raid/codec.py", top / "link-to-codec")
    # rsync leaves a symlink's time alone when the copy's lies in the same second (so it does
    # on ext4 too): an old time makes it set one, which the listings then compare.
    os.utime(top / "link-to-codec", ns=(1_600_000_000_123_456_789,) * 2, follow_symlinks=False)
    os.link(top / "tool.sh", top / "hardlink.sh")
    (top / "big.bin").write_bytes(os.urandom(3 * MiB + 123))
    return str(top)


def test_cp_a(fsm, tree):
    dst = fsm.path("cp")
    sh("cp", "-a", tree, dst)
    sh("diff", "-r", "--no-dereference", tree, dst)
    assert listing(dst) == listing(tree)
    assert os.readlink(os.path.join(dst, "link-to-codec")) == "raid/codec.py"
    assert os.stat(os.path.join(dst, "tool.sh")).st_ino == \
        os.stat(os.path.join(dst, "hardlink.sh")).st_ino


def test_rsync_a(fsm, tree):
    rsync = need("rsync")
    dst = fsm.path("rsync") + "/"
    sh(rsync, "-aH", tree + "/", dst)
    sh("diff", "-r", "--no-dereference", tree, dst)
    assert listing(dst) == listing(tree)
    # A second run finds nothing to do: sizes, times, modes and links all match.
    again = sh(rsync, "-aHi", "--dry-run", tree + "/", dst)
    assert again.strip() == "", again
    # A changed file is the only one sent, and the copy matches again afterwards.
    with open(os.path.join(tree, "email", "utils.py"), "rb") as f:
        orig = f.read()
    changed = sh(rsync, "-aHi", "--checksum", "--dry-run", tree + "/", dst)
    assert changed.strip() == ""
    with open(os.path.join(dst, "email", "utils.py"), "r+b") as f:
        f.seek(100)
        f.write(b"#")
    sent = sh(rsync, "-aHi", "--checksum", tree + "/", dst).split()
    assert "email/utils.py" in sent
    with open(os.path.join(dst, "email", "utils.py"), "rb") as f:
        assert f.read() == orig


def test_tar_both_ways(fsm, tree, tmp_path):
    # Extract from a host archive onto the mount.
    host_tar = tmp_path / "src.tar"
    sh("tar", "--format=posix", "-cf", str(host_tar), "-C", os.path.dirname(tree), "tree")
    into = fsm.path("tar-in")
    os.mkdir(into)
    sh("tar", "-xpf", str(host_tar), "-C", into)
    sh("diff", "-r", "--no-dereference", tree, os.path.join(into, "tree"))
    assert listing(os.path.join(into, "tree")) == listing(tree)
    # Create an archive on the mount from the mount, extract it on the host.
    mount_tar = fsm.path("tar-out.tar.gz")
    sh("tar", "--format=posix", "-czf", mount_tar, "-C", into, "tree")
    sh("tar", "-tzf", mount_tar)
    out = tmp_path / "out"
    out.mkdir()
    sh("tar", "-xpzf", mount_tar, "-C", str(out))
    sh("diff", "-r", "--no-dereference", tree, str(out / "tree"))
    assert listing(str(out / "tree")) == listing(tree)


def test_git(fsm, tree):
    git = need("git")
    repo = fsm.path("repo")
    shutil.copytree(os.path.join(tree, "email"), repo)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org",
               GIT_CONFIG_NOSYSTEM="1", HOME=fsm.mountpoint)
    sh(git, "init", "-q", "-b", "main", cwd=repo, env=env)
    sh(git, "add", "-A", cwd=repo, env=env)
    sh(git, "commit", "-q", "-m", "first", cwd=repo, env=env)
    with open(os.path.join(repo, "utils.py"), "a") as f:
        f.write("# changed\n")
    os.unlink(os.path.join(repo, "base64mime.py"))
    st = sh(git, "status", "--porcelain", cwd=repo, env=env)
    assert st.split("\n")[:2] == [" D base64mime.py", " M utils.py"], st
    sh(git, "commit", "-q", "-am", "second", cwd=repo, env=env)
    log = sh(git, "log", "--format=%s", cwd=repo, env=env).split()
    assert log == ["second", "first"]
    sh(git, "fsck", "--full", "--strict", cwd=repo, env=env)
    sh(git, "gc", "-q", cwd=repo, env=env)  # packs and rewrites objects (mmap, renames)
    sh(git, "fsck", "--full", cwd=repo, env=env)
    assert sh(git, "status", "--porcelain", cwd=repo, env=env) == ""
    shown = sh(git, "show", "HEAD~1:base64mime.py", cwd=repo, env=env)
    with open(os.path.join(tree, "email", "base64mime.py")) as f:
        assert shown == f.read()


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite(fsm, journal):
    path = fsm.path(f"db-{journal}.sqlite")
    with closing(sqlite3.connect(path)) as db:  # an open database keeps the mount busy
        assert db.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
        db.execute("CREATE INDEX t_name ON t (name)")
        with db:  # one transaction, many inserts
            db.executemany("INSERT INTO t (id, name, blob) VALUES (?, ?, ?)",
                           ((i, f"name-{i % 997}", bytes([i % 251]) * (i % 300))
                            for i in range(20000)))
        with db:
            db.execute("DELETE FROM t WHERE id % 3 = 0")
        with pytest.raises(RuntimeError), db:
            db.execute("INSERT INTO t (id, name) VALUES (-1, 'rolled back')")
            raise RuntimeError("abort")
    with closing(sqlite3.connect(path)) as db:  # reopen
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 20000 - 6667
        assert db.execute("SELECT count(*) FROM t WHERE id = -1").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM t WHERE name = 'name-5'").fetchone()[0] == \
            sum(1 for i in range(20000) if i % 997 == 5 and i % 3)
        assert db.execute("SELECT blob FROM t WHERE id = 12346").fetchone()[0] == \
            bytes([12346 % 251]) * (12346 % 300)
        db.execute("VACUUM")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cli = need("sqlite3")
    assert sh(cli, path, "SELECT sum(id) FROM t").strip() == \
        str(sum(i for i in range(20000) if i % 3))


def test_find(fsm, tree):
    dst = fsm.path("find")
    sh("cp", "-a", tree, dst)
    assert listing(dst) == listing(tree)
    py = sorted(sh("find", ".", "-name", "*.py", "-newer", "tool.sh", cwd=dst).split())
    assert py == sorted(sh("find", ".", "-name", "*.py", "-newer", "tool.sh", cwd=tree).split())
    assert sh("find", ".", "-type", "l", cwd=dst).split() == ["./link-to-codec"]
    assert sh("find", ".", "-empty", "-type", "d", cwd=dst).split() == ["./empty"]
    assert sorted(sh("find", ".", "-perm", "-u+x", "-type", "f", cwd=dst).split()) == \
        ["./hardlink.sh", "./tool.sh"]
    assert sh("find", ".", "-size", "+3M", cwd=dst).split() == ["./big.bin"]
    assert sh("find", ".", "-samefile", "tool.sh", "-name", "hard*", cwd=dst).split() == \
        ["./hardlink.sh"]


def test_du_counts_sparse_files_less(fsm):
    d = fsm.path("du")
    os.mkdir(d)
    sparse = os.path.join(d, "sparse")
    with open(sparse, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"x" * 4096)
        f.flush()
        os.fsync(f.fileno())
    full = os.path.join(d, "full")
    with open(full, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    du = {line.split("\t")[1]: int(line.split("\t")[0])
          for line in sh("du", "-k", sparse, full).splitlines()}
    apparent = {line.split("\t")[1]: int(line.split("\t")[0])
                for line in sh("du", "-k", "--apparent-size", sparse, full).splitlines()}
    assert apparent[sparse] == 64 * 1024 and apparent[full] == 4 * 1024
    assert 4 <= du[sparse] <= 1024, du  # one block stored, not 64 MiB
    assert 4 * 1024 <= du[full] <= 4 * 1024 + 256, du
    with open(sparse, "rb") as f:
        f.seek(10 * MiB - 1)
        assert f.read(4098) == b"\0" + b"x" * 4096 + b"\0"


def _df(path: str) -> tuple[int, int, int]:
    """(size, used, available) in bytes, as df shows them."""
    line = sh("df", "-B1", "--output=size,used,avail", path).splitlines()[1]
    size, used, avail = (int(x) for x in line.split())
    return size, used, avail


def test_df(fsm):
    capacity = status(fsm.warehouse)["capacity_bytes"]
    size, used, avail = _df(fsm.mountpoint)
    # The volume's usable capacity, less the two superblocks of the metadata copy.
    assert size == (capacity // SECTOR - RESERVED_SECTORS) * SECTOR
    assert capacity - size <= 2 * MiB
    assert used + avail == size
    path = fsm.path("df-blob")
    with open(path, "wb") as f:
        f.write(os.urandom(24 * MiB))
        f.flush()
        os.fsync(f.fileno())
    _, used2, avail2 = _df(fsm.mountpoint)
    assert used2 - used >= 24 * MiB and avail - avail2 >= 24 * MiB
    assert used2 - used <= 26 * MiB
    os.unlink(path)
    os.sync()
    _, used3, avail3 = _df(fsm.mountpoint)
    assert used3 <= used + MiB and avail3 >= avail - MiB
