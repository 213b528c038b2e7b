"""Faults under a mounted filesystem: kill -9 of the daemon, lost and corrupt members, a lost
or broken metadata database, a full volume.

The tests share one raidz2 warehouse of five 64 MiB members and run in order; each leaves it
mounted (and healthy) for the next.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mountutil import (
    FsMount,
    daemon_pid,
    drop_caches,
    dwfs,
    force_unmount,
    is_mounted,
    make_warehouse,
    pid_alive,
    status,
    wait_for_log,
)

from raid.geometry import Geometry
from vfs.alloc import Allocator

MiB = 1 << 20
ENOSPC_TEXT = "No space left on device"


def content(i: int) -> bytes:
    """The bytes of the writer's file number i (reproducible)."""
    rng = random.Random(i)
    return rng.randbytes(rng.choice([4096, 65536, 200_000, 1 << 20, (2 << 20) + 17]))


WRITER = """
import os, random, sys
sys.path.insert(0, sys.argv[3])
from test_fs_faults import content
top, log = sys.argv[1], sys.argv[2]
tag = " ".join(sys.argv[4:5] + [""])  # a word before each number logged, if given
files = int(sys.argv[5]) if len(sys.argv) > 5 else None  # then only unsynced writes
lf = open(log, "a")
i = 0
while files is None or i < files:
    data = content(i)
    fd = os.open(os.path.join(top, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    lf.write(f"{tag}{i}\\n")
    lf.flush()
    os.fsync(lf.fileno())
    # Unsynced writes alongside, so the kill also lands on dirty buffers.
    with open(os.path.join(top, f"unsynced{i % 4}"), "wb") as f:
        f.write(os.urandom(300_000))
    i += 1
while True:  # all files written: unsynced writes alone, until the mount goes
    with open(os.path.join(top, "unsynced"), "wb") as f:
        f.write(os.urandom(300_000))
"""


@pytest.fixture(scope="module")
def fsm(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    m = FsMount(make_warehouse(base / "wh"), base / "mnt")
    m.base = base  # type: ignore[attr-defined]
    try:
        m.mount()
        yield m
    finally:
        force_unmount(m.mountpoint, m.warehouse)


@pytest.fixture(autouse=True)
def still_mounted(fsm):
    """Every test starts on the mounted warehouse: after a failure that left it unmounted, the
    next test stops here instead of writing (until ENOSPC, in test_enospc) into the bare
    directory on the host's disk."""
    assert is_mounted(fsm.mountpoint), "an earlier test left the warehouse unmounted"


def fsck(fsm: FsMount, *args: str) -> subprocess.CompletedProcess:
    return dwfs("fsck", fsm.warehouse, *args, check=False)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_kill9_during_heavy_writes(fsm):
    top = fsm.path("kill")
    os.mkdir(top)
    log = fsm.base / "fsynced.log"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, top, str(log),
                               os.path.dirname(__file__)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and writer.poll() is None:
        if log.exists() and len(log.read_text().split()) >= 25:
            break
        time.sleep(0.05)
    assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
    pid = daemon_pid(fsm.warehouse)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    writer.wait(timeout=60)
    assert writer.returncode != 0  # it was cut off mid-way by the dead mount
    unmount = subprocess.run(["fusermount3", "-u", fsm.mountpoint], capture_output=True,
                             text=True, check=False)
    assert unmount.returncode == 0, unmount.stderr
    assert not is_mounted(fsm.mountpoint)
    fsm.mount()  # no manual repair
    drop_caches()
    synced = [int(x) for x in log.read_text().split()]
    assert len(synced) >= 25
    for i in synced:
        assert read_file(os.path.join(top, f"f{i}")) == content(i), f"file f{i} differs"
    fsm.umount()
    p = fsck(fsm, "--verify-data")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "clean" in p.stdout
    fsm.mount()


def version(n: int) -> bytes:
    """Version n of the replaced file: a header naming n, then bytes only n gives."""
    body = random.Random(n).randbytes(random.Random(-n).choice([100, 5000, 70_000, 300_000]))
    return f"version {n} {len(body)}\n".encode() + body


REPLACER = """
import os, sys
sys.path.insert(0, sys.argv[3])
from test_fs_faults import version
top, log = sys.argv[1], sys.argv[2]
lf = open(log, "a")
dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
n = int(sys.argv[4])
while True:
    # the editor's way: write a new file, fsync it, rename it over the old one, fsync the
    # directory; around it, names come and go
    tmp = os.path.join(top, f"cfg.tmp{n}")
    with open(tmp, "wb") as f:
        f.write(version(n))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(top, "cfg"))
    os.fsync(dfd)
    lf.write(f"{n}\\n")
    lf.flush()
    os.fsync(lf.fileno())
    d = os.path.join(top, f"d{n % 7}")
    os.makedirs(os.path.join(d, "sub"), exist_ok=True)
    with open(os.path.join(d, f"x{n}"), "wb") as f:
        f.write(os.urandom(n % 5 * 9000))
    if os.path.lexists(os.path.join(top, f"hard{n % 3}.new")):  # left by a crash
        os.unlink(os.path.join(top, f"hard{n % 3}.new"))
    os.link(os.path.join(d, f"x{n}"), os.path.join(top, f"hard{n % 3}.new"))
    os.replace(os.path.join(top, f"hard{n % 3}.new"), os.path.join(top, f"hard{n % 3}"))
    if n % 7 == 6 and os.path.isdir(os.path.join(top, "d0")):
        for e in os.listdir(os.path.join(top, "d0")):
            if e != "sub":
                os.unlink(os.path.join(top, "d0", e))
        os.rename(os.path.join(top, "d0"), os.path.join(top, f"gone{n}"))
        os.rmdir(os.path.join(top, f"gone{n}", "sub"))
        os.rmdir(os.path.join(top, f"gone{n}"))
    n += 1
"""


def test_kill9_during_replace_by_rename_keeps_a_whole_version(fsm):
    """kill -9 of the daemon while a program replaces a file by rename (fsync'd) among
    mkdir, link, rename and rmdir: after each of three crashes the mount comes back without
    repair, the file is one whole version no older than the last one fsync'd, and fsck is
    clean."""
    top = fsm.path("replace")
    os.mkdir(top)
    log = fsm.base / "replaced.log"
    rng = random.Random(7)
    start = 0
    for cycle in range(3):
        writer = subprocess.Popen([sys.executable, "-c", REPLACER, top, str(log),
                                   os.path.dirname(__file__), str(start)],
                                  stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        want = start + rng.randint(10, 40)
        while time.monotonic() < deadline and writer.poll() is None:
            if log.exists() and int(([-1] + log.read_text().split())[-1]) >= want:
                break
            time.sleep(0.01)
        assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
        os.kill(daemon_pid(fsm.warehouse), signal.SIGKILL)
        writer.wait(timeout=60)
        subprocess.run(["fusermount3", "-u", fsm.mountpoint], check=True)
        p = fsck(fsm)
        assert p.returncode == 0 and "clean" in p.stdout, f"cycle {cycle}: {p.stdout}{p.stderr}"
        fsm.mount()
        drop_caches()
        last = int(log.read_text().split()[-1])
        data = read_file(os.path.join(top, "cfg"))
        head, _, _ = data.partition(b"\n")
        n = int(head.split()[1])
        assert n >= last, f"cycle {cycle}: cfg is version {n}, {last} was fsync'd"
        assert data == version(n), f"cycle {cycle}: cfg is not a whole version {n}"
        for name in os.listdir(top):  # every name left by the crash can be read
            path = os.path.join(top, name)
            if os.path.isfile(path):
                read_file(path)
        start = n + 1
    fsm.umount()
    p = fsck(fsm, "--verify-data")
    assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
    fsm.mount()


def _corrupt_member(path: str, warehouse: str) -> None:
    """Scribble over most of a member's data area (labels and tables stay intact)."""
    cfg = status(warehouse)
    g = Geometry.plan(cfg["level"], len(cfg["members"]), 65536, 64 * MiB)
    with open(path, "r+b") as f:
        for row in range(0, 600, 2):
            f.seek(g.data_offset + row * g.chunk + 512)
            f.write(os.urandom(8192))


@pytest.mark.parametrize("fault", ["deleted", "corrupted"])
def test_member_fault_while_mounted(fsm, fault):
    d = fsm.path(f"member-{fault}")
    os.mkdir(d)
    files = {os.path.join(d, f"g{i}"): os.urandom(1 + i * 300_000) for i in range(12)}
    for path, data in files.items():
        write_file(path, data)
    slot = 1 if fault == "deleted" else 3
    victim = status(fsm.warehouse)["members"][slot]["path"]
    if fault == "deleted":
        os.unlink(victim)
        log = wait_for_log(fsm.warehouse, f"({victim}) failed and is taken out of service")
        assert f"({victim}) failed and is taken out of service" in log
    else:
        _corrupt_member(victim, fsm.warehouse)
    drop_caches()
    for path, data in files.items():
        assert read_file(path) == data, path
    more = os.urandom(3 * MiB)
    write_file(os.path.join(d, "written-while-" + fault), more)
    drop_caches()
    assert read_file(os.path.join(d, "written-while-" + fault)) == more
    doc = status(fsm.warehouse)
    named = doc["members"][slot]
    assert named["path"] == victim
    if fault == "deleted":
        assert doc["state"] == "degraded"
        assert named["state"] != "active"
        assert [m["slot"] for m in doc["members"] if m["state"] != "active"] == [slot]
    else:
        # Corrupt chunks are reconstructed from parity and rewritten: the member stays in
        # service and its errors are counted against it by name.
        assert named["checksum_errors"] > 0 and named["repaired"] > 0
        assert all(m["checksum_errors"] == 0 for m in doc["members"] if m["slot"] != slot)
    out = dwfs("status", fsm.warehouse).stdout
    assert os.path.relpath(victim, fsm.warehouse) in out
    rebuilt = dwfs("replace", fsm.warehouse, str(slot))
    assert "rebuilt" in rebuilt.stdout
    doc = status(fsm.warehouse)
    assert doc["state"] == "clean"
    assert all(m["state"] == "active" for m in doc["members"])
    scrub = json.loads(dwfs("scrub", fsm.warehouse, "--json").stdout)
    assert scrub["errors"] == 0 and scrub["unrecoverable"] == 0
    drop_caches()
    for path, data in files.items():
        assert read_file(path) == data, path


def _files_then_corrupt_member(fsm, name: str, slot: int) -> tuple[dict[str, bytes], str]:
    """Ten files in a new directory `name`, then, unmounted, member `slot` scribbled over
    (`_corrupt_member`): the files and the member's path."""
    d = fsm.path(name)
    os.mkdir(d)
    files = {os.path.join(d, f"f{i}"): os.urandom(1 + i * 500_000) for i in range(10)}
    for path, data in files.items():
        write_file(path, data)
    victim = status(fsm.warehouse)["members"][slot]["path"]
    fsm.umount()
    _corrupt_member(victim, fsm.warehouse)
    return files, victim


def test_error_counts_are_kept_until_cleared(fsm):
    """A member's error counts outlive the mount that met them (a failing disk stays named
    after a reboot, as ZFS keeps them until `zpool clear`); `dwfs clear` forgets them."""
    files, victim = _files_then_corrupt_member(fsm, "counts", 4)
    fsm.mount()
    drop_caches()
    for path, data in files.items():
        assert read_file(path) == data, path
    seen = status(fsm.warehouse)["members"][4]
    assert seen["checksum_errors"] > 0 and seen["repaired"] > 0
    fsm.umount()
    kept = status(fsm.warehouse)["members"]  # unmounted: read from the labels
    # (unmounting may meet another damaged chunk: a final write's parity update reads one)
    assert kept[4]["checksum_errors"] >= seen["checksum_errors"]
    assert kept[4]["repaired"] >= seen["repaired"]
    assert all(m["checksum_errors"] == 0 for m in kept[:4])
    assert "kept from one mount to the next" in dwfs("status", fsm.warehouse).stdout
    fsm.mount()
    assert status(fsm.warehouse)["members"][4]["checksum_errors"] >= kept[4]["checksum_errors"]
    dwfs("scrub", fsm.mountpoint, "--repair")  # what the reads did not meet
    cleared = dwfs("clear", fsm.mountpoint)
    assert f"cleared the error counts of 5 members of {fsm.warehouse}" in cleared.stdout
    for where in ("mounted", "unmounted"):
        doc = status(fsm.warehouse)
        assert all(m[k] == 0 for m in doc["members"] for k in
                   ("checksum_errors", "repaired", "read_errors", "write_errors")), where
        if where == "mounted":
            fsm.umount()
    assert "kept from one mount" not in dwfs("status", fsm.warehouse).stdout
    fsm.mount()
    drop_caches()
    for path, data in files.items():
        assert read_file(path) == data, path


def test_enospc(fsm):
    before = {fsm.path(f"pre{i}"): os.urandom(500_000) for i in range(3)}
    for path, data in before.items():
        write_file(path, data)
    fill = fsm.path("fill")
    p = subprocess.run(["dd", "if=/dev/urandom", f"of={fill}", "bs=1M", "conv=fsync",
                        "status=none"], capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode != 0 and ENOSPC_TEXT in p.stderr, p.stderr
    filled = os.path.getsize(fill)
    assert filled > 10 * MiB
    with pytest.raises(OSError) as exc:
        write_file(fsm.path("one-more"), os.urandom(4 * MiB))
    assert exc.value.errno == 28
    drop_caches()
    for path, data in before.items():
        assert read_file(path) == data
    avail_full = os.statvfs(fsm.mountpoint).f_bavail
    os.unlink(fill)
    os.unlink(fsm.path("one-more"))
    # A removed file's space comes back when the kernel forgets its inode (it may still send
    # requests for it until then): normally before unlink returns, now and then a moment
    # later (as ZFS and btrfs free space at their next commit).
    deadline = time.monotonic() + 10
    while True:
        st = os.statvfs(fsm.mountpoint)
        back = (st.f_bavail - avail_full) * st.f_frsize
        if back >= filled - MiB or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert back >= filled - MiB, "df shows no space back"
    fsm.filled = filled  # type: ignore[attr-defined]


def test_writes_succeed_after_rm_on_a_full_volume(fsm):
    """Runs right after test_enospc, which filled the volume and removed the filler."""
    filled = fsm.filled  # type: ignore[attr-defined]
    st = os.statvfs(fsm.mountpoint)
    again = os.urandom(filled // 2)
    try:
        write_file(fsm.path("after-rm"), again)
    except OSError as exc:
        pytest.fail(f"writing {len(again)} bytes after rm failed ({exc}); statvfs {st}")
    drop_caches()
    assert read_file(fsm.path("after-rm")) == again
    os.unlink(fsm.path("after-rm"))


def test_allocator_reuses_space_before_its_cursor():
    """Freed space that merges around the allocation cursor is found again (found by
    test_enospc: ENOSPC with 130 MB free in one extent)."""
    a = Allocator(100, [])
    (start,) = a.allocate_each([90])
    a.free(start, 90)
    assert a.allocate_each([16]) == [0]
    assert a.extents() == [(16, 84)] and a.free_count == 84


def test_fsck_clean_then_broken_db_found_and_repaired(fsm):
    keep = fsm.path("keep")
    write_file(keep, b"keep me" * 1000)
    fsm.umount()
    p = fsck(fsm)
    assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
    db = sqlite3.connect(os.path.join(fsm.warehouse, "meta.db"))
    with db:
        ino = db.execute("SELECT inode FROM dentries WHERE name=? AND parent=1",
                         (b"keep",)).fetchone()[0]
        db.execute("UPDATE inodes SET nlink=7 WHERE id=?", (ino,))
        db.execute("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, 999999)",
                   (b"dangling",))
    db.close()
    p = fsck(fsm)
    assert p.returncode == 4, p.stdout + p.stderr
    assert f"inode {ino}: link count 7, should be 1" in p.stdout
    assert "b'dangling'" in p.stdout and "missing inode 999999" in p.stdout
    p = fsck(fsm, "--repair")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "errors corrected" in p.stdout
    p = fsck(fsm)
    assert p.returncode == 0, p.stdout + p.stderr
    fsm.mount()
    assert read_file(keep) == b"keep me" * 1000
    assert os.stat(keep).st_nlink == 1
    assert not os.path.exists(fsm.path("dangling"))


def test_fsck_verify_data_names_and_repairs_corrupt_member_chunks(fsm):
    """`fsck --verify-data` reads every file through the volume. Chunks that fail their
    checksums are rebuilt from redundancy, so the files read correctly, but the member still
    holds them: fsck names the member instead of saying "clean", and `--repair` rewrites
    them (it said "clean", exit 0, before)."""
    files, victim = _files_then_corrupt_member(fsm, "verify", 2)
    p = fsck(fsm, "--verify-data")
    assert p.returncode == 4, p.stdout + p.stderr
    assert f"found: member slot 2 ({victim}): " in p.stdout, p.stdout
    assert "failed their checksums" in p.stdout and "damaged:" not in p.stdout
    p = fsck(fsm, "--verify-data", "--repair")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"fixed: member slot 2 ({victim}): " in p.stdout
    assert "rewritten from redundancy" in p.stdout and "errors corrected" in p.stdout
    p = fsck(fsm, "--verify-data")
    assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
    dwfs("scrub", fsm.warehouse, "--repair")  # the parity chunks fsck does not read
    scrub = json.loads(dwfs("scrub", fsm.warehouse, "--json").stdout)
    assert scrub["errors"] == 0 and scrub["unrecoverable"] == 0
    fsm.mount()
    drop_caches()
    for path, data in files.items():
        assert read_file(path) == data, path


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_lost_metadata_db_restored_from_copy(fsm, damage):
    d = fsm.path(f"meta-{damage}")
    os.mkdir(d)
    files = {os.path.join(d, f"h{i}"): os.urandom(70_000 * (i + 1)) for i in range(8)}
    for path, data in files.items():
        with open(path, "wb") as f:  # no fsync: the unmount makes them durable
            f.write(data)
    os.symlink("h1", os.path.join(d, "link"))
    fsm.umount()
    meta = os.path.join(fsm.warehouse, "meta.db")
    if damage == "deleted":
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(meta + suffix):
                os.unlink(meta + suffix)
    else:
        size = os.path.getsize(meta)
        with open(meta, "r+b") as f:
            for off in range(4096, size, 8192):
                f.seek(off)
                f.write(os.urandom(2048))
    p = dwfs("mount", fsm.warehouse, fsm.mountpoint, check=False)
    assert p.returncode == 1 and not is_mounted(fsm.mountpoint)
    assert f"dwfs fsck --repair {fsm.warehouse}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = fsck(fsm)
    assert p.returncode == 4, p.stdout + p.stderr
    assert "holds a metadata copy" in p.stderr and "fsck --repair" in p.stderr
    p = fsck(fsm, "--repair")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "restored the metadata from the copy" in p.stdout
    assert " ago)" in p.stdout and "taken" in p.stdout
    p = fsck(fsm)
    assert p.returncode == 0, p.stdout + p.stderr
    fsm.mount()
    drop_caches()
    for path, data in files.items():
        assert read_file(path) == data, path
    assert os.readlink(os.path.join(d, "link")) == "h1"
    assert read_file(fsm.path("keep")) == b"keep me" * 1000


def test_daemon_left_behind_is_none(fsm):
    """After all of it, one daemon serves the mount and unmounting leaves nothing."""
    pid = daemon_pid(fsm.warehouse)
    assert pid is not None and pid_alive(pid)
    p = fsck(fsm)  # cannot check a mounted warehouse: exit 8 as e2fsck, nothing touched
    assert p.returncode == 8 and f"in use by process {pid}" in p.stderr, p.stderr
    fsm.umount()
    assert not pid_alive(pid)
    p = fsck(fsm, "--verify-data")
    assert p.returncode == 0, p.stdout + p.stderr
