"""Pulled plugs: the warehouse (members, metadata database, lock and log) lives on a disk that
loses every write not yet fsync'd, or a random part of them, when the power goes
(tests/powercutfs.py). dwfs is killed with it while one program writes and fsyncs files and
another replaces a file the way editors do; the next mount must need no repair, every byte that
fsync returned for must be there, every file must read, and fsck and scrub must be clean.

kill -9 alone (test_fs_faults) leaves every write the daemon made in the host's page cache;
only a pulled plug tests the order in which dwfs makes data, parity, checksums, the write-intent
record and the metadata durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mountutil import (
    DWFS,
    FsMount,
    daemon_pid,
    drop_caches,
    dwfs,
    force_unmount,
    is_mounted,
    make_warehouse,
    status,
    wait_for_log,
)
from test_fs_faults import REPLACER, WRITER, content, read_file, version, write_file
from test_ghosts import reading, sha256_of, state, stored

DISK = Path(__file__).with_name("powercutfs.py")
MiB = 1 << 20
# One pulled plug each; DWFS_POWERCUT_PLUGS=N for a longer run.
SEEDS = tuple(range(11, 11 + int(os.environ.get("DWFS_POWERCUT_PLUGS", "3"))))
SYNCED_PER_CYCLE = 12  # files fsync'd before the plug is pulled
KEEP_CYCLES = 3  # the files of older cycles are removed


@contextmanager
def disk(durable: Path, mountpoint: Path, seed: int, above: FsMount):
    """The power-cut disk mounted over `durable`; yields its process. On the way out the
    mount `above` (of the warehouse on the disk) goes first, so the disk can end cleanly."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(DISK), str(durable), str(mountpoint),
                             str(seed)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the power-cut disk did not mount"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            force_unmount(above.mountpoint, above.warehouse)
            force_unmount(mountpoint)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        force_unmount(mountpoint)


def synced(log: Path) -> list[tuple[str, int]]:
    """(directory, file number) of every file the writers saw fsync return for."""
    if not log.exists():
        return []
    return [(d, int(i)) for d, i in (line.split() for line in log.read_text().splitlines())]


def check_synced(mnt: FsMount, log: Path, replaced: Path, gone: frozenset = frozenset()) -> int:
    """Every fsync'd file (but those in the directories `gone`) reads back exactly, the
    replaced file is one whole version no older than the last one fsync'd, and every other
    file can be read; returns how many files were fsync'd."""
    drop_caches()
    done = synced(log)
    for d, i in done:
        if d not in gone:
            assert read_file(mnt.path(d, f"f{i}")) == content(i), f"{d}/f{i} differs"
    if replaced.exists():
        last = int(replaced.read_text().split()[-1])
        data = read_file(mnt.path("replace", "cfg"))
        n = int(data.partition(b"\n")[0].split()[1])
        assert n >= last, f"cfg is version {n}, {last} was fsync'd"
        assert data == version(n), f"cfg is not a whole version {n}"
    for root, _dirs, files in os.walk(mnt.mountpoint):
        for name in files:  # what was not synced may be lost, but reads without error
            read_file(os.path.join(root, name))
    return len(done)


def pull_the_plug(mnt: FsMount, disk_proc: subprocess.Popen, disk_mnt: Path,
                  writers: list[subprocess.Popen], at_fsync: bool) -> None:
    """Power off, now or (`at_fsync`) as one of the next few fsyncs reaches the disk: the disk
    keeps what it had written back, and the daemon dies with it."""
    pid = daemon_pid(mnt.warehouse)
    assert pid is not None
    if not at_fsync:
        os.kill(pid, signal.SIGKILL)
    disk_proc.send_signal(signal.SIGUSR1 if at_fsync else signal.SIGTERM)
    _, said = disk_proc.communicate(timeout=60)
    if at_fsync:
        os.kill(pid, signal.SIGKILL)  # it outlived its disk by a moment
    assert disk_proc.returncode == 0, said
    # The plug caught writes in flight (the disk kept a random part of them).
    m = re.search(r"pulled the plug: (\d+) unsynced blocks in \d+ files", said.decode())
    assert m and int(m.group(1)) > 0, said
    for w in writers:
        w.wait(60)
        assert w.returncode != 0  # cut off mid-way by the dead mount
    for point in (mnt.mountpoint, disk_mnt):
        subprocess.run(["fusermount3", "-u", str(point)], capture_output=True, check=False)
        assert not is_mounted(point)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("backend", "degraded"),
                         [("file", False), ("sqlite", False), ("file", True)])
def test_pulled_plugs_keep_every_fsynced_byte(tmp_path, backend, degraded):
    """`degraded`: a member is deleted before the first plug and replaced after the last."""
    durable, disk_mnt = tmp_path / "durable", tmp_path / "disk"
    make_warehouse(durable / "wh", backend=backend)
    mnt = FsMount(disk_mnt / "wh", tmp_path / "mnt")
    log, replaced = tmp_path / "fsynced.log", tmp_path / "replaced.log"
    here = os.path.dirname(__file__)
    gone: set[str] = set()  # the directories of old cycles, removed
    try:
        for cycle, seed in enumerate(SEEDS):
            with disk(durable, disk_mnt, seed, mnt) as disk_proc:
                mnt.mount()  # after the last plug, with no repair
                before = check_synced(mnt, log, replaced, frozenset(gone))
                if cycle >= KEEP_CYCLES:  # room for the next, and space freed and reused
                    gone.add(f"c{cycle - KEEP_CYCLES}")
                    shutil.rmtree(mnt.path(f"c{cycle - KEEP_CYCLES}"))
                name = f"c{cycle}"
                os.mkdir(mnt.path(name))
                if cycle == 0:
                    os.mkdir(mnt.path("replace"))
                if cycle == 0 and degraded:
                    os.unlink(status(mnt.warehouse)["members"][1]["path"])
                    wait_for_log(mnt.warehouse, "failed and is taken out of service")
                    assert status(mnt.warehouse)["state"] == "degraded"
                start = int(([-1] + replaced.read_text().split())[-1]) + 1 if cycle else 0
                writers = [
                    subprocess.Popen([sys.executable, "-c", WRITER, mnt.path(name), str(log),
                                      here, name, str(SYNCED_PER_CYCLE + 8)],
                                     stderr=subprocess.PIPE),
                    subprocess.Popen([sys.executable, "-c", REPLACER, mnt.path("replace"),
                                      str(replaced), here, str(start)], stderr=subprocess.PIPE),
                ]
                deadline = time.monotonic() + 120
                while len(synced(log)) < before + SYNCED_PER_CYCLE:
                    for w in writers:
                        assert w.poll() is None, w.stderr.read().decode() if w.stderr else ""
                    assert time.monotonic() < deadline, "the writer made no progress"
                    time.sleep(0.05)
                pull_the_plug(mnt, disk_proc, disk_mnt, writers, at_fsync=cycle % 2 == 1)
        with disk(durable, disk_mnt, 0, mnt):
            mnt.mount()
            total = check_synced(mnt, log, replaced, frozenset(gone))
            assert total >= len(SEEDS) * SYNCED_PER_CYCLE
            st = status(mnt.warehouse)
            assert st["state"] == ("degraded" if degraded else "clean"), st
            # Writes the plug cut short are not damage: no member is blamed for them.
            assert [m["checksum_errors"] for m in st["members"]] == [0] * 5, st
            if degraded:
                assert "array clean" in dwfs("replace", mnt.warehouse, "1").stdout
                total = check_synced(mnt, log, replaced, frozenset(gone))
                # A plug while degraded may leave a stripe whose parity it tore, and with it
                # chunks no file uses unreadable: scrub --repair writes those anew.
                p = dwfs("scrub", mnt.warehouse, "--repair", "--json", check=False)
                assert p.returncode == 0 and json.loads(p.stdout)["unrecoverable"] == 0, \
                    p.stdout + p.stderr
            mnt.umount()
            p = dwfs("fsck", mnt.warehouse, "--verify-data", check=False)
            assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
            p = dwfs("scrub", mnt.warehouse, check=False)
            assert p.returncode == 0, p.stdout + p.stderr
    finally:
        force_unmount(mnt.mountpoint, mnt.warehouse if is_mounted(disk_mnt) else None)


@pytest.mark.timeout(600)
def test_pulled_plug_during_a_rebuild_resumes_it(tmp_path):
    """The plug is pulled while `dwfs replace` rebuilds a deleted member online; the next
    mount resumes the rebuild, which ends clean with every file intact and no member blamed."""
    durable, disk_mnt = tmp_path / "durable", tmp_path / "disk"
    make_warehouse(durable / "wh")
    mnt = FsMount(disk_mnt / "wh", tmp_path / "mnt")
    files = {f"g{i}": random.Random(i).randbytes(1 + i * 200_000) for i in range(30)}
    try:
        with disk(durable, disk_mnt, 1, mnt) as disk_proc:
            mnt.mount()
            for name, data in files.items():
                write_file(mnt.path(name), data)
            victim = status(mnt.warehouse)["members"][2]["path"]
            os.unlink(victim)
            wait_for_log(mnt.warehouse, "failed and is taken out of service")
            # Paced (as md's speed_limit_max) so that the plug lands after a checkpoint.
            replace = subprocess.Popen([*DWFS, "replace", mnt.warehouse, "2", "--max-rate", "16M"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while True:
                assert replace.poll() is None, replace.communicate()
                member = status(mnt.warehouse)["members"][2]
                if member["state"] == "rebuilding" and (member["rebuilt_bytes"] or 0) > 0:
                    break
                assert time.monotonic() < deadline, "the rebuild made no progress"
                time.sleep(0.02)
            pull_the_plug(mnt, disk_proc, disk_mnt, [replace], at_fsync=True)
        with disk(durable, disk_mnt, 0, mnt):
            mnt.mount()
            resumed = re.search(r"slot 2: resuming rebuild at row (\d+)",
                                wait_for_log(mnt.warehouse, "resuming rebuild at row"))
            assert resumed and int(resumed.group(1)) > 0  # from its last checkpoint
            deadline = time.monotonic() + 300
            while (st := status(mnt.warehouse))["state"] != "clean":
                assert st["state"] == "rebuilding", st
                assert time.monotonic() < deadline, "the resumed rebuild did not end"
                time.sleep(0.2)
            assert [m["checksum_errors"] for m in st["members"]] == [0] * 5, st
            drop_caches()
            for name, data in files.items():
                assert read_file(mnt.path(name)) == data, name
            mnt.umount()
            p = dwfs("fsck", mnt.warehouse, "--verify-data", check=False)
            assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
            scrub = json.loads(dwfs("scrub", mnt.warehouse, "--json").stdout)
            assert scrub["errors"] == 0 and scrub["unrecoverable"] == 0, scrub
    finally:
        force_unmount(mnt.mountpoint, mnt.warehouse if is_mounted(disk_mnt) else None)


@pytest.mark.timeout(600)
def test_pulled_plug_during_a_ghost_fetch(tmp_path):
    """Ghosts imported (the command returned), one fetched and fsync'd, a large one being
    fetched when the plug goes: the next mount has every ghost, the fsync'd one hydrated, the
    large one a ghost or hydrated with its source's exact bytes, and fsck is clean."""
    durable, disk_mnt = tmp_path / "durable", tmp_path / "disk"
    make_warehouse(durable / "wh", size="128M")
    mnt = FsMount(disk_mnt / "wh", tmp_path / "mnt")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(200):
        (src / "sub" / f"f{i}.txt").write_bytes(f"file {i}\n".encode())
    big = random.Random(3).randbytes(96 * MiB)
    (src / "big.bin").write_bytes(big)
    dest = mnt.path("g")
    try:
        with disk(durable, disk_mnt, 21, mnt) as disk_proc:
            mnt.mount()
            os.mkdir(dest)
            fd = os.open(mnt.mountpoint, os.O_RDONLY)
            os.fsync(fd)  # the destination directory itself is durable
            os.close(fd)
            dwfs("ghost", "import", str(src), dest)
            small = os.path.join(dest, "sub", "f7.txt")
            assert read_file(small) == b"file 7\n"
            assert stored(small) == "hydrated"
            fd = os.open(small, os.O_RDONLY)
            os.fsync(fd)  # makes its state durable
            os.close(fd)
            reader = reading(os.path.join(dest, "big.bin"), 8 * MiB)
            pull_the_plug(mnt, disk_proc, disk_mnt, [reader], at_fsync=False)
        with disk(durable, disk_mnt, 0, mnt):
            mnt.mount()
            names = sorted(os.listdir(os.path.join(dest, "sub")))
            assert names == sorted(f"f{i}.txt" for i in range(200))
            assert state(small) == "hydrated"
            assert read_file(small) == b"file 7\n"
            assert state(os.path.join(dest, "big.bin")) in ("ghost", "hydrated")
            assert sha256_of(os.path.join(dest, "big.bin")) == hashlib.sha256(big).hexdigest()
            assert stored(os.path.join(dest, "big.bin")) == "hydrated"
            mnt.umount()
            p = dwfs("fsck", mnt.warehouse, "--verify-data", check=False)
            assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
    finally:
        force_unmount(mnt.mountpoint, mnt.warehouse if is_mounted(disk_mnt) else None)
