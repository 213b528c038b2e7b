"""chattr's flags on the mount, beside ext4: lsattr and chattr (FS_IOC_GETFLAGS/SETFLAGS),
xfs_io's FS_IOC_FSGETXATTR/FSSETXATTR, and what immutable, append-only and no-atime files and
directories refuse, errno for errno as on an ext4 directory beside the mount. Setting immutable
or append-only needs CAP_LINUX_IMMUTABLE, so this module runs as root."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess

import pytest
from mountutil import dwfs, scratch_mount
from posixutil import (
    APPEND,
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    FS_IOC_FSGETXATTR,
    FS_IOC_FSSETXATTR,
    IMMUTABLE,
    NOATIME,
    NOBODY,
    NODUMP,
    as_user,
    clear_flags,
    fallocate,
    get_flags,
    set_flags,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i and +a need CAP_LINUX_IMMUTABLE"),
    pytest.mark.timeout(180),
]

XFLAGS_KEPT = 0x08 | 0x10 | 0x40 | 0x80
COMPRESS = 0x04  # FS_COMPR_FL: ext4 takes it (and ignores it); dwfs refuses it


def outcome(func, *args) -> int:
    """0 if `func(*args)` succeeds, else its errno."""
    try:
        func(*args)
    except OSError as exc:
        return exc.errno
    return 0


def open_close(path: str, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


def write_at(fd: int, data: bytes, offset: int) -> None:
    os.pwrite(fd, data, offset)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def immutable_file(top: str) -> dict:
    f, other = f"{top}/f", f"{top}/other"
    with open(f, "wb") as out:
        out.write(b"data")
    with open(other, "wb") as out:
        out.write(b"other")
    os.setxattr(f, "user.kept", b"1")
    before = os.open(f, os.O_RDWR)  # opened before the flag: writes must still be refused
    try:
        set_flags(f, IMMUTABLE)
        st = os.stat(f)
        got = {
            "flags": get_flags(f),
            "open wronly": outcome(open_close, f, os.O_WRONLY),
            "open rdwr append": outcome(open_close, f, os.O_RDWR | os.O_APPEND),
            "open rdonly trunc": outcome(open_close, f, os.O_RDONLY | os.O_TRUNC),
            "open rdonly": outcome(open_close, f, os.O_RDONLY),
            "write on an older fd": outcome(write_at, before, b"x", 0),
            "ftruncate on an older fd": outcome(os.ftruncate, before, 0),
            "fallocate on an older fd": outcome(fallocate, before, 0, 0, 8192),
            "unlink": outcome(os.unlink, f),
            "rename away": outcome(os.rename, f, f"{top}/g"),
            "rename over it": outcome(os.rename, other, f),
            "link": outcome(os.link, f, f"{top}/h"),
            "chmod": outcome(os.chmod, f, 0o600),
            "chown": outcome(os.chown, f, NOBODY, NOBODY),
            "utime explicit": outcome(os.utime, f, (1, 1)),
            "utime now": outcome(os.utime, f, None),
            "truncate": outcome(os.truncate, f, 0),
            "setxattr": outcome(os.setxattr, f, "user.new", b"2"),
            "removexattr": outcome(os.removexattr, f, "user.kept"),
            "unchanged": (read(f), st.st_mode, st.st_mtime_ns, st.st_ctime_ns) == (
                b"data", os.stat(f).st_mode, os.stat(f).st_mtime_ns, os.stat(f).st_ctime_ns),
        }
        set_flags(f, 0)
        got["after clearing"] = [outcome(write_at, before, b"D", 0), read(f),
                                 outcome(os.rename, f, f"{top}/g"), outcome(os.unlink, f"{top}/g")]
        return got
    finally:
        os.close(before)


def flagged_directory(top: str, name: str, outside: str, flags: int) -> str:
    """top/name holding a directory `sub` and a file `x`, and a file top/outside beside it;
    the directory gets `flags`."""
    d = f"{top}/{name}"
    os.mkdir(d)
    os.mkdir(f"{d}/sub")
    with open(f"{d}/x", "wb") as out:
        out.write(b"x")
    with open(f"{top}/{outside}", "wb") as out:
        out.write(b"o")
    set_flags(d, flags)
    return d


def immutable_directory(top: str) -> dict:
    d = flagged_directory(top, "d", "outside", IMMUTABLE)
    got = {
        "flags": get_flags(d),
        "create": outcome(open_close, f"{d}/new", os.O_CREAT | os.O_WRONLY),
        "create existing": outcome(open_close, f"{d}/x", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
        "mkdir": outcome(os.mkdir, f"{d}/sub2"),
        "symlink": outcome(os.symlink, "x", f"{d}/ln"),
        "mkfifo": outcome(os.mkfifo, f"{d}/fifo"),
        "unlink": outcome(os.unlink, f"{d}/x"),
        "unlink missing": outcome(os.unlink, f"{d}/missing"),
        "rmdir sub": outcome(os.rmdir, f"{d}/sub"),
        "rename within": outcome(os.rename, f"{d}/x", f"{d}/y"),
        "rename out": outcome(os.rename, f"{d}/x", f"{top}/x"),
        "rename in": outcome(os.rename, f"{top}/outside", f"{d}/outside"),
        "link in": outcome(os.link, f"{top}/outside", f"{d}/l"),
        "link out": outcome(os.link, f"{d}/x", f"{top}/xl"),
        "write a file inside": outcome(write_at_path, f"{d}/x", b"X"),
        "rmdir itself": outcome(os.rmdir, d),
        "rename itself": outcome(os.rename, d, f"{top}/d2"),
        "chmod": outcome(os.chmod, d, 0o700),
        "entries": sorted(os.listdir(d)),
    }
    set_flags(d, 0)
    got["after clearing"] = [outcome(os.unlink, f"{d}/x"), outcome(os.mkdir, f"{d}/sub2")]
    return got


def write_at_path(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def append_only_file(top: str) -> dict:
    a = f"{top}/a"
    with open(a, "wb") as out:
        out.write(b"log\n")
    early = os.open(a, os.O_WRONLY)  # opened for writing before the flag was set
    set_flags(a, APPEND)
    try:
        got = {
            "pwrite at 0, opened before": outcome(write_at, early, b"L", 0),
            "ftruncate, opened before": outcome(os.ftruncate, early, 2),
        }
    finally:
        os.close(early)
    got |= {
        "flags": get_flags(a),
        "open wronly": outcome(open_close, a, os.O_WRONLY),
        "open rdwr": outcome(open_close, a, os.O_RDWR),
        "open append trunc": outcome(open_close, a, os.O_WRONLY | os.O_APPEND | os.O_TRUNC),
        "open rdonly": outcome(open_close, a, os.O_RDONLY),
    }
    fd = os.open(a, os.O_WRONLY | os.O_APPEND)
    try:
        got["append"] = outcome(os.write, fd, b"more\n")
        got["pwrite at 0 appends"] = outcome(write_at, fd, b"end\n", 0)  # O_APPEND wins
        got["ftruncate"] = outcome(os.ftruncate, fd, 0)
        got["fallocate keep size"] = outcome(fallocate, fd, FALLOC_KEEP_SIZE, 0, 4096)
        got["punch hole"] = outcome(fallocate, fd, FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE, 0, 4096)
    finally:
        os.close(fd)
    got.update({
        "content": read(a),
        "truncate": outcome(os.truncate, a, 0),
        "chmod": outcome(os.chmod, a, 0o600),
        "chown": outcome(os.chown, a, NOBODY, NOBODY),
        "utime explicit": outcome(os.utime, a, (1, 1)),
        "utime now": outcome(os.utime, a, None),
        "unlink": outcome(os.unlink, a),
        "rename": outcome(os.rename, a, f"{top}/b"),
        "link": outcome(os.link, a, f"{top}/c"),
        "setxattr": outcome(os.setxattr, a, "user.x", b"1"),
    })
    set_flags(a, 0)
    got["after clearing"] = outcome(os.unlink, a)
    return got


def append_only_directory(top: str) -> dict:
    d = flagged_directory(top, "ad", "z", APPEND)
    got = {
        "create": outcome(open_close, f"{d}/new", os.O_CREAT | os.O_WRONLY),
        "mkdir": outcome(os.mkdir, f"{d}/sub2"),
        "rename in": outcome(os.rename, f"{top}/z", f"{d}/z"),
        "link in": outcome(os.link, f"{d}/z", f"{d}/z2"),
        "unlink": outcome(os.unlink, f"{d}/x"),
        "rmdir": outcome(os.rmdir, f"{d}/sub"),
        "rename within": outcome(os.rename, f"{d}/x", f"{d}/y"),
        "rename over an entry": outcome(os.rename, f"{d}/new", f"{d}/x"),
        "write a file inside": outcome(write_at_path, f"{d}/x", b"X"),
        "entries": sorted(os.listdir(d)),
    }
    set_flags(d, 0)
    return got


def flag_rules(top: str) -> dict:
    """Which flags a user may set, and what is refused to all."""
    f = f"{top}/mine"
    with open(f, "wb") as out:
        out.write(b"m")
    os.chown(f, NOBODY, NOBODY)
    os.chmod(top, 0o755)
    got = {
        "owner sets nodump": outcome(as_user, lambda: set_flags(f, NODUMP)),
        "owner sets immutable": outcome(as_user, lambda: set_flags(f, NODUMP | IMMUTABLE)),
        "owner sets append": outcome(as_user, lambda: set_flags(f, NODUMP | APPEND)),
        "flags after": get_flags(f),
    }
    os.chown(f, 0, 0)
    got["stranger sets nodump"] = outcome(as_user, lambda: set_flags(f, 0))
    set_flags(f, 0)
    return got


def xflags(top: str) -> dict:
    """xfs_io's view: FS_IOC_FSGETXATTR and FS_IOC_FSSETXATTR with struct fsxattr."""
    f = f"{top}/xf"
    open_close(f, os.O_CREAT | os.O_WRONLY)
    fd = os.open(f, os.O_RDONLY)
    try:
        set_flags(f, NOATIME | NODUMP)
        x = struct.unpack("<IIIII8x", fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(28)))
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, struct.pack("<IIIII8x", 0x08, 0, 0, 0, 0))
        return {"xflags": x[0] & XFLAGS_KEPT, "after FSSETXATTR": get_flags(f),
                "write": outcome(open_close, f, os.O_WRONLY)}
    finally:
        set_flags(f, 0)
        os.close(fd)


CASES = [immutable_file, immutable_directory, append_only_file, append_only_directory,
         flag_rules, xflags]


@pytest.fixture(scope="module")
def places():
    """A directory on a fresh mount and one on the ext4 beside it (/var/tmp)."""
    with scratch_mount("dwfs-chattr-", public=True) as (m, base):
        ref = os.path.join(base, "ext4")
        os.mkdir(ref)
        probe = os.path.join(ref, "probe")
        open_close(probe, os.O_CREAT | os.O_WRONLY)
        if outcome(set_flags, probe, NODUMP):
            pytest.skip(f"{ref} does not keep chattr flags")
        set_flags(probe, 0)
        yield m, ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_flags_refuse_what_ext4_refuses(places, case):
    """The same steps on the mount and on ext4 give the same outcomes, step by step."""
    m, ref = places
    here = m.path(case.__name__)
    there = os.path.join(ref, case.__name__)
    os.mkdir(here)
    os.mkdir(there)
    try:
        got, want = case(here), case(there)
    finally:
        for top in (here, there):
            clear_flags(top)
            shutil.rmtree(top)
    assert got == want
    assert errno.EPERM in got.values(), "no step was refused: the case checks nothing"


def test_flags_survive_a_remount_and_noatime_keeps_atime(places):
    """Flags are kept in the metadata (and so after a remount), lsattr shows them, one dwfs
    does not keep is refused, and a no-atime file's atime stays as it was when it is read."""
    m, _ref = places
    d = m.path("kept")
    os.mkdir(d)
    for name in ("i", "a", "A", "plain"):
        with open(f"{d}/{name}", "wb") as out:
            out.write(b"content")
        os.utime(f"{d}/{name}", ns=(10**9, 2 * 10**9))  # atime older than mtime: relatime reads
    set_flags(f"{d}/i", IMMUTABLE | NODUMP)
    set_flags(f"{d}/a", APPEND)
    set_flags(f"{d}/A", NOATIME)
    m.umount()
    m.mount()
    assert [get_flags(f"{d}/{n}") for n in ("i", "a", "A", "plain")] == [
        IMMUTABLE | NODUMP, APPEND, NOATIME, 0]
    listing = subprocess.run(["lsattr", d], capture_output=True, text=True, check=True).stdout
    assert {line.split()[1].rsplit("/", 1)[1]: line.split()[0] for line in listing.splitlines()
            } == {"i": "----i-d---------------", "a": "-----a----------------",
                  "A": "-------A--------------", "plain": "----------------------"}
    assert outcome(os.unlink, f"{d}/i") == outcome(os.unlink, f"{d}/a") == errno.EPERM
    # A flag dwfs does not keep is refused, as tmpfs and XFS refuse theirs (ext4 takes
    # compression and ignores it), and nothing changes.
    assert outcome(set_flags, f"{d}/plain", COMPRESS) == errno.EOPNOTSUPP
    assert get_flags(f"{d}/plain") == 0
    for name in ("A", "plain"):
        read(f"{d}/{name}")
    assert os.stat(f"{d}/A").st_atime_ns == 10**9
    assert os.stat(f"{d}/plain").st_atime_ns > 10**9
    for name in ("i", "a", "A"):
        set_flags(f"{d}/{name}", 0)
    shutil.rmtree(d)


def test_ghost_imports_leave_flagged_places_as_they_are(places, tmp_path):
    """`dwfs ghost import` into an immutable directory is refused (EPERM, nothing made); a
    re-import leaves an immutable ghost and an append-only directory as they are and says so,
    while unflagged ghosts follow their sources as usual."""
    m, _ref = places
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for rel in ("a.txt", "b.txt", "sub/c.txt"):
        (src / rel).write_bytes(rel.encode() * 10)
    locked = m.path("locked")
    os.mkdir(locked)
    set_flags(locked, IMMUTABLE)
    p = dwfs("ghost", "import", str(src), locked, check=False)
    assert p.returncode != 0 and "immutable" in p.stderr
    assert os.listdir(locked) == []
    set_flags(locked, 0)

    dest = m.path("ghosts")
    os.mkdir(dest)
    dwfs("ghost", "import", str(src), dest)
    set_flags(f"{dest}/a.txt", IMMUTABLE)
    set_flags(f"{dest}/sub", APPEND)
    (src / "a.txt").write_bytes(b"changed at the source")
    (src / "b.txt").write_bytes(b"changed too")
    (src / "sub/d.txt").write_bytes(b"new")
    p = dwfs("ghost", "import", str(src), dest)
    assert "a.txt: it is immutable or append-only in the mount" in p.stderr
    assert "sub: it is immutable or append-only in the mount" in p.stderr
    assert os.stat(f"{dest}/a.txt").st_size == len(b"a.txt" * 10)  # the old ghost, kept
    assert os.stat(f"{dest}/b.txt").st_size == len(b"changed too")  # followed its source
    assert sorted(os.listdir(f"{dest}/sub")) == ["c.txt"]  # the directory was not entered
    set_flags(f"{dest}/a.txt", 0)
    set_flags(f"{dest}/sub", 0)
    shutil.rmtree(dest)


def test_imported_ghosts_take_their_directory_s_inherited_flags(places, tmp_path):
    """As a file made in the mount: ghosts and directories an import makes (and the
    entries a re-import adds later) take no-dump and no-atime from their directory, down the
    tree, and keep them across a remount; immutable and append-only are not inherited."""
    m, _ref = places
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        (src / rel).write_bytes(rel.encode() * 10)
    os.symlink("a.txt", src / "link")
    dest = m.path("inherit")
    os.mkdir(dest)
    set_flags(dest, NODUMP | NOATIME | APPEND)
    dwfs("ghost", "import", str(src), dest)
    for rel in ("a.txt", "sub", "sub/b.txt", "sub/deeper", "sub/deeper/c.txt"):
        assert get_flags(f"{dest}/{rel}") == NODUMP | NOATIME, rel
    set_flags(dest, NODUMP | NOATIME)  # a re-import does not enter an append-only directory
    (src / "sub" / "new.txt").write_bytes(b"later")
    dwfs("ghost", "import", str(src), dest)
    assert get_flags(f"{dest}/sub/new.txt") == NODUMP | NOATIME
    assert read(f"{dest}/sub/deeper/c.txt") == b"sub/deeper/c.txt" * 10  # hydrates as ever
    m.umount()
    m.mount()
    assert get_flags(f"{dest}/sub/deeper/c.txt") == NODUMP | NOATIME
    assert get_flags(f"{dest}/sub/new.txt") == NODUMP | NOATIME
    set_flags(dest, 0)
    shutil.rmtree(dest)
