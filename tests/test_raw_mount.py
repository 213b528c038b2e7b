"""The raw volume through a real FUSE mount and the dwfs command line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mountutil import (
    DWFS,
    daemon_pid,
    drop_caches,
    dwfs,
    is_mounted,
    pid_alive,
    status,
    wait_for_log,
)

from backends import open_member
from dwfs.config import load_config
from dwfs.warehouse import open_volume
from raid.assemble import read_label
from raid.geometry import Geometry

MiB = 1 << 20


def _mkfs(tmp_path, level="raid6", devices=6, size="16M", chunk="16K", backend="file"):
    """A warehouse of the raw volume only (`mkfs --raw`): raw mounts of it are writable."""
    wh = tmp_path / "wh"
    dwfs("mkfs", wh, "--level", level, "--devices", devices, "--device-size", size,
         "--chunk-size", chunk, "--backend", backend, "--raw")
    return wh


def _write(path, offset, data, sync=True):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["file", "sqlite"])
def test_write_read_remount(tmp_path, raw_mount, backend):
    wh = _mkfs(tmp_path, backend=backend)
    m = raw_mount(wh)
    m.mount()
    size = os.stat(m.volume).st_size
    assert size == status(wh)["capacity_bytes"]
    head = _read(m.volume, 0, 777)  # untouched bytes before the write
    data = os.urandom(3 * MiB + 12345)
    _write(m.volume, 777, data)
    assert _read(m.volume, 777, len(data)) == data
    pid = daemon_pid(wh)
    m.umount()
    assert pid is not None and not pid_alive(pid), "umount returned before the daemon exited"
    m.mount()
    drop_caches()
    assert _read(m.volume, 777, len(data)) == data
    assert _read(m.volume, 0, 777) == head
    m.umount()
    report = dwfs("scrub", wh, "--json")
    assert '"errors": 0' in report.stdout


def test_dd_and_cmp(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raidz2", devices=5)
    m = raw_mount(wh)
    m.mount()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * MiB))
    subprocess.run(["dd", f"if={src}", f"of={m.volume}", "bs=1M", "conv=fsync,notrunc",
                    "status=none"], check=True)
    drop_caches()
    subprocess.run(["cmp", "-n", str(8 * MiB), str(src), m.volume], check=True)
    # Without notrunc dd would truncate: refused, and the volume keeps its size and data.
    p = subprocess.run(["dd", f"if={src}", f"of={m.volume}", "bs=1M", "count=1",
                        "status=none"], capture_output=True, text=True, check=False)
    assert p.returncode != 0 and "Operation not permitted" in p.stderr
    assert os.stat(m.volume).st_size == status(wh)["capacity_bytes"]
    subprocess.run(["cmp", "-n", str(8 * MiB), str(src), m.volume], check=True)


def test_write_past_end_is_enospc(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid5", devices=3, size="8M")
    m = raw_mount(wh)
    m.mount()
    size = os.stat(m.volume).st_size
    fd = os.open(m.volume, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"x" * 100, size - 10) == 10
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"y", size)
            os.fsync(fd)
        assert exc.value.errno in (28, 27)  # ENOSPC, EFBIG
    finally:
        os.close(fd)
    assert _read(m.volume, size - 10, 100) == b"x" * 10


def test_status_json_keys(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid10", devices=4)
    for doc in (status(wh), None):
        if doc is None:
            m = raw_mount(wh)
            m.mount()
            doc = status(wh)
        assert doc["level"] == "raid10"
        assert doc["tolerance"] == 1
        assert doc["state"] == "clean"
        g = Geometry.plan("raid10", 4, 16384, 16 * MiB)
        assert doc["capacity_bytes"] == g.capacity
        assert [x["slot"] for x in doc["members"]] == [0, 1, 2, 3]
        for x in doc["members"]:
            assert {"slot", "path", "state", "read_errors", "checksum_errors"} <= set(x)
            assert x["state"] == "active" and os.path.exists(x["path"])


def test_member_deleted_while_mounted_then_replaced_online(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid6", devices=6, size="24M")
    m = raw_mount(wh)
    m.mount()
    data = os.urandom(20 * MiB)
    _write(m.volume, 0, data)
    victim = status(wh)["members"][2]["path"]
    os.unlink(victim)
    # The daemon notices by itself, without anyone asking for status.
    log = wait_for_log(wh, "taken out of service")
    assert f"({victim}) failed and is taken out of service" in log
    doc = status(wh)
    assert doc["state"] == "degraded"
    bad = [x for x in doc["members"] if x["state"] != "active"]
    assert [x["path"] for x in bad] == [victim]
    drop_caches()
    assert _read(m.volume, 0, len(data)) == data
    more = os.urandom(2 * MiB)
    _write(m.volume, 21 * MiB, more)
    # Paced (24 MiB at 4 MiB/s) so that status is asked while it runs.
    replace = subprocess.Popen([*DWFS, "replace", str(wh), "2", "--max-rate", "4M"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log(wh, "rebuild starts")
        doc = status(wh)  # answered during the rebuild, not after it
        assert replace.poll() is None, replace.communicate()
        assert doc["state"] == "rebuilding", doc
        assert doc["members"][2]["state"] == "rebuilding", doc
        out, err = replace.communicate(timeout=120)
    finally:
        if replace.poll() is None:
            replace.kill()
            replace.wait()
    assert replace.returncode == 0 and "rebuilt" in out, out + err
    doc = status(wh)
    assert doc["state"] == "clean"
    assert os.path.exists(victim)
    m.umount()
    assert '"errors": 0' in dwfs("scrub", wh, "--json").stdout
    m.mount()
    drop_caches()
    assert _read(m.volume, 0, len(data)) == data
    assert _read(m.volume, 21 * MiB, len(more)) == more


def test_corruption_detected_counted_and_repaired(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid5", devices=4, size="16M")
    m = raw_mount(wh)
    m.mount()
    data = os.urandom(12 * MiB)
    _write(m.volume, 0, data)
    m.umount()
    g = Geometry.plan("raid5", 4, 16384, 16 * MiB)
    victim = status(wh)["members"][1]["path"]
    with open(victim, "r+b") as f:
        for i in range(20):
            f.seek(g.data_offset + i * 7 * g.chunk + 100)
            f.write(os.urandom(64))
    m.mount()
    drop_caches()
    assert _read(m.volume, 0, len(data)) == data
    doc = status(wh)
    assert doc["members"][1]["checksum_errors"] > 0
    assert all(x["checksum_errors"] == 0 for x in doc["members"] if x["slot"] != 1)
    m.umount()
    # Reads already mended what they touched; corrupt again and let scrub find and mend it.
    with open(victim, "r+b") as f:
        f.seek(g.data_offset + 3 * g.chunk)
        f.write(os.urandom(g.chunk))
    first = dwfs("scrub", wh, "--json", check=False)
    assert first.returncode == 1 and '"errors": 0' not in first.stdout
    repair = json.loads(dwfs("scrub", wh, "--repair", "--json").stdout)
    assert repair["fixed"] >= 1 and repair["members"][1]["fixed"] == repair["fixed"]
    assert repair["unrecoverable"] == 0
    assert '"errors": 0' in dwfs("scrub", wh, "--json").stdout


def test_kill9_daemon_keeps_fsynced_data(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid6", devices=5, size="16M")
    m = raw_mount(wh)
    m.mount()
    synced = os.urandom(4 * MiB)
    _write(m.volume, 0, synced)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import os,sys\n"
         "fd=os.open(sys.argv[1],os.O_WRONLY)\n"
         "off=4<<20\n"
         "while True:\n"
         "    os.pwrite(fd,os.urandom(256<<10),off)\n"
         "    off=(4<<20)+((off+(256<<10)-(4<<20))%(8<<20))\n",
         m.volume],
    )
    time.sleep(1.5)
    pid = daemon_pid(wh)
    os.kill(pid, signal.SIGKILL)
    writer.wait(timeout=30)
    subprocess.run(["fusermount3", "-u", m.mountpoint], check=False)
    if is_mounted(m.mountpoint):
        subprocess.run(["fusermount3", "-uz", m.mountpoint], check=False)
    assert not is_mounted(m.mountpoint)
    m.mount()
    drop_caches()
    assert _read(m.volume, 0, len(synced)) == synced
    m.umount()
    assert '"errors": 0' in dwfs("scrub", wh, "--json").stdout


def test_umount_of_busy_mount_fails_and_keeps_serving(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid1", devices=2, size="8M")
    m = raw_mount(wh)
    m.mount()
    fd = os.open(m.volume, os.O_RDWR)
    try:
        proc = dwfs("umount", m.mountpoint, check=False)
        assert proc.returncode != 0 and "busy" in proc.stderr.lower()
        assert is_mounted(m.mountpoint)
        os.pwrite(fd, b"still here", 0)
    finally:
        os.close(fd)
    m.umount()


def test_bad_input_changes_nothing(tmp_path, raw_mount):
    wh = tmp_path / "wh"
    p = dwfs("mkfs", wh, "--level", "raid7", "--devices", 4, "--device-size", "8M", check=False)
    assert p.returncode == 1 and "unknown level 'raid7'" in p.stderr
    assert not wh.exists()
    p = dwfs("mkfs", wh, "--level", "raid6", "--devices", 3, "--device-size", "8M", check=False)
    assert p.returncode == 1 and "raid6 needs at least 4 members" in p.stderr
    assert not wh.exists()
    p = dwfs("mkfs", wh, "--level", "raid5", "--devices", 3, "--device-size", "lots",
             check=False)
    assert p.returncode == 1 and "not a size" in p.stderr
    assert not wh.exists()
    _mkfs(tmp_path, level="raid5", devices=3, size="8M")
    before = (wh / "dwfs.toml").read_text()
    p = dwfs("mkfs", wh, "--level", "raid5", "--devices", 3, "--device-size", "8M", check=False)
    assert p.returncode == 1 and "already holds a warehouse" in p.stderr
    assert (wh / "dwfs.toml").read_text() == before
    (wh / "dwfs.toml").write_text(before.replace('level = "raid5"', 'level = raid5'))
    p = dwfs("status", wh, check=False)
    assert p.returncode == 1 and "not valid TOML" in p.stderr
    (wh / "dwfs.toml").write_text(before)
    p = dwfs("umount", tmp_path, check=False)
    assert p.returncode == 1 and "not mounted" in p.stderr
    p = dwfs("mount", "--raw", tmp_path / "nowhere", tmp_path, check=False)
    assert p.returncode == 1 and "not a dwfs warehouse" in p.stderr
    m = raw_mount(wh)
    m.mount()
    other = tmp_path / "other"
    other.mkdir()
    p = dwfs("mount", "--raw", wh, other, check=False)
    assert p.returncode == 1 and "in use" in p.stderr
    assert not is_mounted(other)


def _member_bytes(wh) -> list[bytes]:
    return [open(m["path"], "rb").read() for m in status(wh)["members"]]


def test_raw_mount_of_a_filesystem_is_read_only(tmp_path, raw_mount, fs_mount):
    """Writes through the raw volume would bypass the filesystem on it: `mount --raw` of a
    warehouse that holds one mounts read-only (even with `-o rw`), says so, and changes not a
    byte of the members; the filesystem then mounts as before and fsck finds nothing."""
    wh = tmp_path / "wh"
    dwfs("mkfs", wh, "--level", "raid5", "--devices", 3, "--device-size", "16M")
    fs = fs_mount(wh, "fs")
    fs.mount()
    blob = os.urandom(3 * MiB + 123)
    with open(fs.path("kept"), "wb") as f:
        f.write(blob)
    fs.umount()
    before = _member_bytes(wh)
    m = raw_mount(wh)
    for options in ((), ("-o", "rw")):
        p = dwfs("mount", "--raw", wh, m.mountpoint, *options)
        assert f"{wh} holds a dwfs filesystem: its raw volume is mounted read-only" in p.stderr
        assert "ro" in open("/proc/mounts").read().split(f" {m.mountpoint} ")[1].split()[1]
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as exc:
                os.open(m.volume, flags)
            assert exc.value.errno == errno.EROFS
        assert len(_read(m.volume, 0, MiB)) == MiB
        m.umount()
        assert _member_bytes(wh) == before
    fs.mount()
    with open(fs.path("kept"), "rb") as f:
        assert f.read() == blob
    fs.umount()
    assert dwfs("fsck", wh, "--verify-data", check=False).returncode == 0


def test_mkfs_raw_makes_a_warehouse_without_a_filesystem(tmp_path, raw_mount, fs_mount):
    """`mkfs --raw`: no metadata database; the filesystem mount and fsck say the warehouse
    holds a raw volume only and change nothing; its raw mount is writable, without a note."""
    wh = tmp_path / "wh"
    p = dwfs("mkfs", wh, "--level", "raid5", "--devices", 3, "--device-size", "16M", "--raw")
    assert "no filesystem" in p.stdout and "mount --raw" in p.stdout
    assert not (wh / "meta.db").exists()
    before = _member_bytes(wh)
    fs = fs_mount(wh, "fs")
    p = dwfs("mount", wh, fs.mountpoint, check=False)
    assert p.returncode == 1 and "holds a raw volume only" in p.stderr
    assert not is_mounted(fs.mountpoint)
    p = dwfs("fsck", wh, check=False)
    assert p.returncode == 8 and "holds a raw volume only, not a filesystem" in p.stderr
    p = dwfs("fsck", wh, "--repair", check=False)
    assert p.returncode == 8 and "holds a raw volume only, not a filesystem" in p.stderr
    assert _member_bytes(wh) == before and not (wh / "meta.db").exists()
    m = raw_mount(wh)
    p = dwfs("mount", "--raw", wh, m.mountpoint)
    assert "read-only" not in p.stderr
    blob = os.urandom(MiB)
    _write(m.volume, 5 * MiB, blob)
    m.umount()
    m.mount()
    assert _read(m.volume, 5 * MiB, MiB) == blob


def _loop_available() -> bool:
    import shutil

    return os.getuid() == 0 and shutil.which("losetup") is not None and os.path.exists(
        "/dev/loop-control"
    )


@pytest.mark.skipif(not _loop_available(), reason="needs root and loop devices")
@pytest.mark.timeout(300)
def test_loop_mounted_ext4_survives_a_lost_member(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid6", devices=5, size="32M", chunk="64K")
    m = raw_mount(wh)
    m.mount()
    subprocess.run(["mkfs.ext4", "-q", "-F", m.volume], check=True)
    ext = tmp_path / "ext"
    ext.mkdir()
    tree = os.path.dirname(os.__file__) + "/json"
    loop = subprocess.run(["losetup", "-f", "--show", m.volume], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(ext)], check=True)
        try:
            subprocess.run(["cp", "-a", tree, str(ext / "json")], check=True)
        finally:
            subprocess.run(["umount", str(ext)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    os.unlink(status(wh)["members"][0]["path"])
    assert status(wh)["state"] == "degraded"
    drop_caches()
    fsck = subprocess.run(["e2fsck", "-fn", m.volume], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    loop = subprocess.run(["losetup", "-f", "--show", "-r", m.volume], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro", loop, str(ext)], check=True)
        try:
            subprocess.run(["diff", "-r", tree, str(ext / "json")], check=True)
        finally:
            subprocess.run(["umount", str(ext)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def _fill_and_kill_replace_half_way(wh, blob):
    """Fill the volume, lose member 1, start `dwfs replace` and kill -9 it part way."""
    cap = status(wh)["capacity_bytes"]
    v = open_volume(load_config(str(wh)))
    for off in range(0, cap - len(blob), len(blob)):
        v.write(off, blob)
    v.close()
    victim = status(wh)["members"][1]["path"]
    os.unlink(victim)
    # Paced, so that the rebuild is surely still running when it is killed.
    proc = subprocess.Popen([sys.executable, "-m", "dwfs.cli", "replace", str(wh), "1",
                             "--max-rate", "20M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    rebuilt = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        # A fresh rebuilding member's label records the checkpoint; read it from the file.
        try:
            member = open_member(victim)
            label = read_label(member)
            member.close()
        except (OSError, ValueError):
            continue
        rebuilt = label.slots[1].rebuilt_rows
        if label.slots[1].state == "rebuilding" and rebuilt > 0:
            proc.kill()
            break
    proc.wait(timeout=30)
    assert rebuilt > 0, "the rebuild never checkpointed"
    doc = status(wh)
    assert doc["members"][1]["state"] == "rebuilding"
    assert doc["members"][1]["rebuilt_bytes"] > 0
    return cap


def _check_filled(wh, blob, cap):
    assert '"errors": 0' in dwfs("scrub", wh, "--json").stdout
    v = open_volume(load_config(str(wh)))
    try:
        for off in range(0, cap - len(blob), 7 * len(blob)):
            assert v.read(off, len(blob)) == blob
    finally:
        v.close()


@pytest.mark.timeout(300)
def test_mount_finishes_an_interrupted_rebuild(tmp_path, raw_mount):
    wh = _mkfs(tmp_path, level="raid5", devices=3, size="256M", chunk="64K")
    blob = os.urandom(1 << 20)
    cap = _fill_and_kill_replace_half_way(wh, blob)
    m = raw_mount(wh)
    m.mount()
    deadline = time.monotonic() + 120
    while status(wh)["state"] != "clean" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status(wh)["state"] == "clean"
    assert _read(m.volume, 0, len(blob)) == blob
    m.umount()
    _check_filled(wh, blob, cap)


@pytest.mark.timeout(300)
def test_replace_killed_half_way_resumes(tmp_path):
    wh = _mkfs(tmp_path, level="raid5", devices=3, size="256M", chunk="64K")
    blob = os.urandom(1 << 20)
    cap = _fill_and_kill_replace_half_way(wh, blob)
    out = dwfs("replace", wh, "1").stdout
    assert "resumed the interrupted rebuild" in out
    assert status(wh)["state"] == "clean"
    _check_filled(wh, blob, cap)


def test_replace_refuses_what_would_lose_data(tmp_path):
    wh = _mkfs(tmp_path, level="raid0", devices=2, size="8M")
    before = status(wh)
    p = dwfs("replace", wh, "0", check=False)
    assert p.returncode == 1 and "cannot be rebuilt" in p.stderr
    assert status(wh)["members"] == before["members"]
    assert os.path.exists(before["members"][0]["path"])
    wh5 = tmp_path / "wh5"
    dwfs("mkfs", wh5, "--level", "raid5", "--devices", 3, "--device-size", "8M")
    os.unlink(status(wh5)["members"][2]["path"])
    p = dwfs("replace", wh5, "0", check=False)
    assert p.returncode == 1 and "cannot be rebuilt" in p.stderr
    assert status(wh5)["members"][0]["state"] == "active"
    p = dwfs("replace", wh5, "7", check=False)
    assert p.returncode == 1 and "slot 7 does not exist" in p.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("level,devices", [("raid6", 5), ("raid10", 4), ("raidz3", 6)])
def test_random_io_matches_a_model(tmp_path, raw_mount, level, devices):
    """Random pwrite/pread/fsync through FUSE against an in-memory model, with a remount."""
    import random

    wh = _mkfs(tmp_path, level=level, devices=devices, size="8M", chunk="4K")
    m = raw_mount(wh)
    m.mount()
    size = os.stat(m.volume).st_size
    with open(m.volume, "rb") as f:  # mkfs put an empty filesystem's metadata copy there
        model = bytearray(f.read())
    assert len(model) == size
    rng = random.Random(f"{level}-{devices}")
    for round_ in range(2):
        fd = os.open(m.volume, os.O_RDWR)
        try:
            for _ in range(300):
                op = rng.random()
                off = rng.randrange(size)
                length = rng.choice([1, 511, 4096, 4097, 20000, 70000, 300000])
                if op < 0.5:
                    data = rng.randbytes(length)
                    n = os.pwrite(fd, data, off)
                    assert n == min(length, size - off)
                    model[off : off + n] = data[:n]
                elif op < 0.95:
                    got = os.pread(fd, length, off)
                    assert got == bytes(model[off : off + length]), (off, length)
                else:
                    os.fsync(fd)
        finally:
            os.close(fd)
        if round_ == 0:
            m.umount()
            m.mount()
    drop_caches()
    with open(m.volume, "rb") as f:
        assert f.read() == bytes(model)


def test_replace_refuses_a_device_that_is_in_use(tmp_path):
    wh = _mkfs(tmp_path, level="raid5", devices=3, size="8M")
    other = tmp_path / "other"
    dwfs("mkfs", other, "--level", "raid1", "--devices", 2, "--device-size", "8M")
    os.unlink(status(wh)["members"][2]["path"])
    sibling = status(wh)["members"][0]["path"]
    before = open(sibling, "rb").read()[4096:]  # the label's event count may move on
    p = dwfs("replace", wh, "2", "--device", sibling, check=False)
    assert p.returncode == 1 and "is the member in slot 0 of this array" in p.stderr
    assert open(sibling, "rb").read()[4096:] == before
    foreign = status(other)["members"][1]["path"]
    p = dwfs("replace", wh, "2", "--device", foreign, check=False)
    assert p.returncode == 1 and "holds slot 1 of dwfs array" in p.stderr, p.stderr
    assert "--force overwrites it" in p.stderr
    assert status(other)["state"] == "clean"
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(8 << 20)
    dwfs("replace", wh, "2", "--device", blank)
    doc = status(wh)
    assert doc["state"] == "clean" and doc["members"][2]["path"] == str(blank)
