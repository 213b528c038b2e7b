"""Smart folders through a real mount: defining them with setfattr and `dwfs smart`, what they
list (the files themselves, mirrors of directories, clash names), live updates, the errno of
every refused change, and persistence across remount and fsck.

One mount for the module; each test works in its own directory and its own smart folders,
whose queries use `under:` so tests do not see each other's files.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time

import pytest
from mountutil import dwfs, make_warehouse, mounted_warehouse
from posixutil import birth_time, errno_of

Q = "user.dwfs.query"


@pytest.fixture(scope="module")
def fsm(tmp_path_factory):
    """One mounted filesystem for the whole module."""
    with mounted_warehouse(tmp_path_factory.mktemp("smart")) as m:
        yield m


def write(path: str, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def smart(path: str, query: str) -> None:
    os.makedirs(path, exist_ok=True)
    os.setxattr(path, Q, query.encode())


def names(path: str) -> set[str]:
    return set(os.listdir(path))


def test_setfattr_makes_a_smart_folder_of_the_files_themselves(fsm):
    top = fsm.path("t1")
    write(os.path.join(top, "data", "a.pdf"), b"A" * 100)
    write(os.path.join(top, "data", "sub", "b.PDF"), b"B" * 10)
    write(os.path.join(top, "data", "c.txt"), b"C")
    folder = os.path.join(top, "pdfs")
    os.mkdir(folder)
    r = subprocess.run(["setfattr", "-n", Q, "-v", "ext:pdf AND under:/t1/data", folder],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    got = subprocess.run(["getfattr", "--only-values", "-n", Q, folder],
                         capture_output=True, text=True, check=True).stdout
    assert got == "ext:pdf AND under:/t1/data"
    assert names(folder) == {"a.pdf", "b.PDF"}
    original = os.stat(os.path.join(top, "data", "a.pdf"))
    shown = os.stat(os.path.join(folder, "a.pdf"))
    assert (shown.st_ino, shown.st_size) == (original.st_ino, 100)
    with open(os.path.join(folder, "a.pdf"), "r+b") as f:  # writing through the folder
        f.write(b"Z")
    with open(os.path.join(top, "data", "a.pdf"), "rb") as f:
        assert f.read() == b"Z" + b"A" * 99
    with open(os.path.join(folder, "b.PDF"), "rb") as f:
        assert f.read() == b"B" * 10


def test_name_clashes_get_a_stable_inode_suffix(fsm):
    top = fsm.path("t2")
    for d in ("x", "y", "z"):
        write(os.path.join(top, d, "report.txt"), d.encode())
    inos = sorted(os.stat(os.path.join(top, d, "report.txt")).st_ino for d in ("x", "y", "z"))
    folder = os.path.join(top, "reports")
    smart(folder, "name:report.txt under:/t2")
    expected = {"report.txt", f"report #{inos[1]}.txt", f"report #{inos[2]}.txt"}
    assert names(folder) == expected
    assert names(folder) == expected  # the same names on every listing
    for name in expected:
        st = os.stat(os.path.join(folder, name))
        assert st.st_ino in inos
    assert os.stat(os.path.join(folder, "report.txt")).st_ino == inos[0]
    assert errno_of(os.stat, os.path.join(folder, f"report #{inos[0]}.txt")) == errno.ENOENT
    assert errno_of(os.stat, os.path.join(folder, "report #999999.txt")) == errno.ENOENT


def test_lookups_agree_with_listings_for_hard_links(fsm):
    """Found by the model test: an inode shown as y.txt that also has the name x.txt must not
    take x.txt from the file the listing shows under it."""
    top = fsm.path("t11")
    write(os.path.join(top, "b", "y.txt"), b"y")
    write(os.path.join(top, "a", "x.txt"), b"x")
    os.link(os.path.join(top, "b", "y.txt"), os.path.join(top, "b", "x.txt"))
    folder = os.path.join(top, "texts")
    smart(folder, "ext:txt under:/t11")
    assert names(folder) == {"y.txt", "x.txt"}
    for name, original in (("y.txt", "b/y.txt"), ("x.txt", "a/x.txt")):
        assert os.stat(os.path.join(folder, name)).st_ino == os.stat(
            os.path.join(top, original)).st_ino


def test_a_matching_directory_is_shown_as_a_browsable_directory(fsm):
    top = fsm.path("t3")
    write(os.path.join(top, "projects", "apollo", "plan.md"), b"plan")
    write(os.path.join(top, "projects", "apollo", "deep", "x.bin"), b"xx")
    os.setxattr(os.path.join(top, "projects", "apollo"), "user.project", b"apollo")
    folder = os.path.join(top, "apollo-dirs")
    smart(folder, "xattr:user.project=apollo type:dir")
    assert names(folder) == {"apollo"}
    shown = os.path.join(folder, "apollo")
    st = os.stat(shown)
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_ino != os.stat(os.path.join(top, "projects", "apollo")).st_ino  # a mirror
    real_birth = birth_time(os.path.join(top, "projects", "apollo"))
    assert real_birth is not None and birth_time(shown) == real_birth  # statx of a mirror
    assert names(shown) == {"plan.md", "deep"}
    assert names(os.path.join(shown, "deep")) == {"x.bin"}
    with open(os.path.join(shown, "deep", "x.bin"), "rb") as f:
        assert f.read() == b"xx"
    assert os.stat(os.path.join(shown, "plan.md")).st_ino == os.stat(
        os.path.join(top, "projects", "apollo", "plan.md")).st_ino
    # find walks the whole tree, smart folders included, without loops or errors
    r = subprocess.run(["find", top], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert os.path.join(shown, "deep", "x.bin") in r.stdout.splitlines()
    # names cannot change inside a mirror either
    assert errno_of(os.mkdir, os.path.join(shown, "new")) == errno.EPERM
    assert errno_of(os.unlink, os.path.join(shown, "plan.md")) == errno.EPERM


def test_listings_follow_changes_live(fsm):
    top = fsm.path("t4")
    os.makedirs(os.path.join(top, "in"))
    folder = os.path.join(top, "big-invoices")
    smart(folder, "under:/t4/in AND size>=1K AND (tag:invoice OR name:inv-*)")
    assert names(folder) == set()
    f = os.path.join(top, "in", "inv-1.dat")
    write(f, b"")
    assert names(folder) == set()  # too small
    write(f, b"x" * 2048)
    assert names(folder) == {"inv-1.dat"}
    os.rename(f, os.path.join(top, "in", "other.dat"))
    assert names(folder) == set()  # renamed out of the name pattern
    os.setxattr(os.path.join(top, "in", "other.dat"), "user.tags", b"paid, invoice")
    assert names(folder) == {"other.dat"}
    assert os.path.exists(os.path.join(folder, "other.dat"))
    os.removexattr(os.path.join(top, "in", "other.dat"), "user.tags")
    assert not os.path.exists(os.path.join(folder, "other.dat"))  # lookups are not cached
    os.setxattr(os.path.join(top, "in", "other.dat"), "user.tags", b"invoice")
    assert os.path.exists(os.path.join(folder, "other.dat"))
    os.unlink(os.path.join(top, "in", "other.dat"))
    assert names(folder) == set()
    assert not os.path.exists(os.path.join(folder, "other.dat"))
    # chmod: a permission query
    g = os.path.join(top, "in", "script.sh")
    write(g, b"#!/bin/sh\n" * 200)
    exe = os.path.join(top, "scripts")
    smart(exe, "under:/t4/in name:*.sh")
    assert names(exe) == {"script.sh"}
    os.chmod(g, 0o755)
    assert os.stat(os.path.join(exe, "script.sh")).st_mode & 0o777 == 0o755
    if os.geteuid() == 0:  # an ownership change moves a file into an owner query
        mine = os.path.join(top, "owned")
        smart(mine, "under:/t4/in owner:4321")
        assert names(mine) == set()
        os.chown(g, 4321, -1)
        assert names(mine) == {"script.sh"}
        os.chown(g, 0, -1)
        assert names(mine) == set()


def test_every_change_of_names_in_a_smart_folder_is_refused(fsm):
    top = fsm.path("t5")
    write(os.path.join(top, "src", "a.log"), b"log")
    write(os.path.join(top, "elsewhere.log"), b"other")
    folder = os.path.join(top, "logs")
    smart(folder, "ext:log under:/t5/src")
    inside = os.path.join(folder, "a.log")
    before = names(folder)
    assert errno_of(os.open, os.path.join(folder, "new.txt"), os.O_CREAT | os.O_WRONLY) \
        == errno.EPERM
    assert errno_of(os.mkdir, os.path.join(folder, "d")) == errno.EPERM
    assert errno_of(os.open, folder, os.O_TMPFILE | os.O_RDWR, 0o600) == errno.EPERM
    assert errno_of(os.symlink, "a.log", os.path.join(folder, "l")) == errno.EPERM
    assert errno_of(os.link, os.path.join(top, "elsewhere.log"),
                    os.path.join(folder, "h.log")) == errno.EPERM
    assert errno_of(os.mkfifo, os.path.join(folder, "p")) == errno.EPERM
    assert errno_of(os.rename, os.path.join(top, "elsewhere.log"),
                    os.path.join(folder, "moved.log")) == errno.EPERM
    assert errno_of(os.rename, inside, os.path.join(top, "out.log")) == errno.EPERM
    assert errno_of(os.rename, inside, os.path.join(folder, "b.log")) == errno.EPERM
    assert errno_of(os.unlink, inside) == errno.EPERM
    assert errno_of(os.rmdir, inside) in (errno.EPERM, errno.ENOTDIR)
    assert names(folder) == before
    assert os.path.exists(os.path.join(top, "src", "a.log"))
    assert os.path.exists(os.path.join(top, "elsewhere.log"))
    assert not os.path.exists(os.path.join(top, "out.log"))


def test_names_looked_up_before_the_folder_was_smart(fsm):
    top = fsm.path("t10")
    write(os.path.join(top, "src", "late.txt"), b"late")
    folder = os.path.join(top, "later")
    os.mkdir(folder)
    assert not os.path.exists(os.path.join(folder, "late.txt"))  # a negative lookup
    os.setxattr(folder, Q, b"name:late.txt under:/t10/src")
    with open(os.path.join(folder, "late.txt"), "rb") as f:
        assert f.read() == b"late"


def test_bad_definitions_are_refused_and_change_nothing(fsm):
    top = fsm.path("t6")
    write(os.path.join(top, "full", "f"), b"")
    assert errno_of(os.setxattr, os.path.join(top, "full"), Q, b"ext:pdf") == errno.ENOTEMPTY
    assert errno_of(os.setxattr, os.path.join(top, "full", "f"), Q, b"ext:pdf") == errno.ENOTDIR
    os.mkdir(os.path.join(top, "empty"))
    for bad in (b"size>10Q", b"(ext:pdf", b"colour:red", b"ext:pdf AND", b"",
                b"owner:no-such-user-here", b"\xff\xfe"):
        assert errno_of(os.setxattr, os.path.join(top, "empty"), Q, bad) == errno.EINVAL
    assert errno_of(os.getxattr, os.path.join(top, "empty"), Q) == errno.ENODATA
    write(os.path.join(top, "empty", "ok"), b"still an ordinary directory")
    assert names(os.path.join(top, "empty")) == {"ok"}
    assert names(os.path.join(top, "full")) == {"f"}


def test_removing_the_query_or_the_folder(fsm):
    top = fsm.path("t7")
    write(os.path.join(top, "src", "k.md"), b"k")
    folder = os.path.join(top, "md")
    smart(folder, "ext:md under:/t7/src")
    assert names(folder) == {"k.md"}
    os.removexattr(folder, Q)
    assert names(folder) == set()  # a plain empty directory again
    write(os.path.join(folder, "own"), b"mine")
    assert names(folder) == {"own"}
    other = os.path.join(top, "md2")
    smart(other, "ext:md under:/t7/src")
    os.rmdir(other)  # a smart folder has no entries of its own: rmdir removes it
    assert not os.path.exists(other)
    assert os.path.exists(os.path.join(top, "src", "k.md"))


def test_smart_folders_nest_and_do_not_recurse(fsm):
    top = fsm.path("t8")
    write(os.path.join(top, "a", "b", "c", "deep.csv"), b"1,2")
    inner = os.path.join(top, "a", "b", "csvs")
    smart(inner, "ext:csv under:/t8/a")
    assert names(inner) == {"deep.csv"}
    dirs = os.path.join(top, "dirs")
    smart(dirs, "name:b under:/t8")
    assert names(dirs) == {"b"}
    seen = os.path.join(dirs, "b", "csvs")  # a smart folder seen through a mirror: empty
    assert stat.S_ISDIR(os.stat(seen).st_mode)
    assert names(seen) == set()
    assert names(os.path.join(dirs, "b")) == {"c", "csvs"}


def test_smart_cli(fsm):
    top = fsm.path("t9")
    write(os.path.join(top, "p", "one.jpg"), b"j" * 3000)
    write(os.path.join(top, "p", "two.jpg"), b"j")
    folder = os.path.join(top, "big-jpgs")
    r = dwfs("smart", "add", folder, "ext:jpg size>2K under:/t9")
    assert "1 entries" in r.stdout
    assert names(folder) == {"one.jpg"}
    assert dwfs("smart", "show", folder).stdout.strip() == "ext:jpg size>2K under:/t9"
    listed = json.loads(dwfs("smart", "list", fsm.mountpoint, "--json").stdout)
    mine = [f for f in listed if f["path"] == folder]
    assert mine == [{"path": folder, "query": "ext:jpg size>2K under:/t9", "entries": 1}]
    bad = dwfs("smart", "add", os.path.join(top, "bad"), "ext:jpg AND (size>2K", check=False)
    assert bad.returncode != 0
    assert "column" in bad.stderr and "^" in bad.stderr
    assert not os.path.exists(os.path.join(top, "bad"))
    not_smart = dwfs("smart", "rm", os.path.join(top, "p"), check=False)
    assert not_smart.returncode != 0 and "not a smart folder" in not_smart.stderr
    assert os.path.isdir(os.path.join(top, "p"))
    dwfs("smart", "rm", folder)
    assert not os.path.exists(folder)


def test_smart_folders_survive_remount_and_fsck(tmp_path, fs_mount):
    m = fs_mount(make_warehouse(tmp_path / "wh"))
    m.mount()
    write(m.path("docs", "a.txt"), b"a")
    write(m.path("docs", "b.md"), b"b")
    smart(m.path("texts"), "ext:txt")
    assert names(m.path("texts")) == {"a.txt"}
    m.umount()
    r = dwfs("fsck", m.warehouse, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m.mount()
    assert names(m.path("texts")) == {"a.txt"}
    assert os.getxattr(m.path("texts"), Q) == b"ext:txt"
    write(m.path("docs", "c.txt"), b"c")
    deadline = time.monotonic() + 1.0
    while names(m.path("texts")) != {"a.txt", "c.txt"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert names(m.path("texts")) == {"a.txt", "c.txt"}


def _ts(text: str) -> int:
    """Nanoseconds since the epoch of a local time `YYYY-MM-DD HH:MM`."""
    return int(time.mktime(time.strptime(text, "%Y-%m-%d %H:%M"))) * 10**9


OPS_QUERIES = {
    "name:*.pdf": {"report.pdf", "link.pdf"},
    "ext:pdf": {"report.pdf", "Notes.PDF", "link.pdf"},
    "size>1M": {"report.pdf", "big.bin"},
    "size<=100 type:file": {"empty.csv", "deep.csv", "g.txt"},
    "size=0 type:file": {"empty.csv"},
    "size>=10K size<1M": {"Notes.PDF"},
    "mtime<7d type:file": {"report.pdf", "notes.txt"},
    "mtime>30d type:file": {"Notes.PDF", "big.bin", "deep.csv", "empty.csv", "g.txt"},
    "mtime>2026-01-01 AND mtime<2026-02-01": {"deep.csv"},
    "mtime=2026-01-15": {"deep.csv"},
    "atime>2025-05-01 atime<2025-07-01": {"big.bin"},
    "ctime<1h type:file": {"report.pdf", "Notes.PDF", "notes.txt", "big.bin", "empty.csv",
                           "deep.csv", "g.txt"},
    "ctime>1h": set(),
    "type:dir": {"docs", "data", "sub", "apollo-dir", "ghosts"},
    "type:symlink": {"link.pdf"},
    "type:fifo": {"pipe"},
    "under:/ops/data": {"big.bin", "empty.csv", "sub", "deep.csv"},
    "under:/ops/missing": set(),
    "xattr:user.project=apollo": {"report.pdf", "apollo-dir"},
    "xattr:user.project": {"report.pdf", "apollo-dir", "big.bin"},
    "tag:invoice": {"report.pdf", "empty.csv"},
    "tag:paid": {"report.pdf"},
    "state:ghost": {"g.txt"},
    "state:local type:file": {"report.pdf", "Notes.PDF", "notes.txt", "big.bin", "empty.csv",
                              "deep.csv"},
    "(ext:pdf OR ext:csv) AND NOT size=0": {"report.pdf", "Notes.PDF", "link.pdf", "deep.csv"},
    "NOT type:file": {"docs", "data", "sub", "apollo-dir", "ghosts", "link.pdf", "pipe"},
    "ext:pdf size>1M OR tag:invoice": {"report.pdf", "empty.csv"},
    "NOT (ext:pdf OR type:dir) AND (name:*.csv OR name:*.bin)": {"big.bin", "empty.csv",
                                                                  "deep.csv"},
}
OWNER_QUERIES = {
    "owner:1000": {"report.pdf"},
    "group:1000": {"report.pdf"},
    "owner:root type:file size<1M": {"Notes.PDF", "notes.txt", "empty.csv", "deep.csv", "g.txt"},
}


@pytest.fixture(scope="module")
def ops_tree(fsm, tmp_path_factory):
    """A tree in /ops of the mount with a file for every query operator to find."""
    top = fsm.path("ops")
    day = 86400 * 10**9
    now = time.time_ns()
    files = {
        "docs/report.pdf": (2 * 1024 * 1024, now - 3 * day),
        "docs/Notes.PDF": (10 * 1024, now - 40 * day),
        "docs/notes.txt": (500, now),
        "data/big.bin": (20 * 1024 * 1024, _ts("2025-06-01 12:00")),
        "data/empty.csv": (0, _ts("2025-01-01 12:00")),
        "data/sub/deep.csv": (100, _ts("2026-01-15 12:00")),
    }
    for rel, (size, mtime) in files.items():
        p = os.path.join(top, rel)
        write(p, b"")
        os.truncate(p, size)
        os.utime(p, ns=(mtime, mtime))
    os.symlink("docs/report.pdf", os.path.join(top, "link.pdf"))
    os.mkfifo(os.path.join(top, "pipe"))
    os.mkdir(os.path.join(top, "apollo-dir"))
    os.setxattr(os.path.join(top, "apollo-dir"), "user.project", b"apollo")
    os.setxattr(os.path.join(top, "docs/report.pdf"), "user.project", b"apollo")
    os.setxattr(os.path.join(top, "data/big.bin"), "user.project", b"zeus")
    os.setxattr(os.path.join(top, "docs/report.pdf"), "user.tags", b"invoice, paid")
    os.setxattr(os.path.join(top, "data/empty.csv"), "user.tags", b"Invoice")
    if os.geteuid() == 0:
        os.chown(os.path.join(top, "docs/report.pdf"), 1000, 1000)
    src = tmp_path_factory.mktemp("ops-src")
    (src / "g.txt").write_bytes(b"ghost\n")
    old = _ts("2024-01-01 12:00")
    os.utime(src / "g.txt", ns=(old, old))
    os.mkdir(os.path.join(top, "ghosts"))
    dwfs("ghost", "import", str(src), os.path.join(top, "ghosts"))
    return top


@pytest.mark.parametrize("query", sorted(OPS_QUERIES) + sorted(OWNER_QUERIES))
def test_every_query_operator_through_the_mount(fsm, ops_tree, query):
    expected = OPS_QUERIES.get(query, OWNER_QUERIES.get(query))
    if query in OWNER_QUERIES and os.geteuid() != 0:
        pytest.skip("owner queries need files of another owner: run as root")
    folder = fsm.path("ops-smart", str(abs(hash(query))))
    smart(folder, f"under:/ops AND ({query})")
    assert names(folder) == expected
