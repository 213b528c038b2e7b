"""Members on block devices (loop devices here): a warehouse whose disks come back under other
device names, as after a reboot or a move to other ports, mounts as it was."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import pytest
from mountutil import dwfs, status

log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.skipif(
        os.getuid() != 0 or shutil.which("losetup") is None
        or not os.path.exists("/dev/loop-control"),
        reason="needs root and loop devices"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def loops():
    """attach(path) -> loop device, detach(device); every device still attached is
    detached at teardown."""
    attached: list[str] = []

    def attach(path) -> str:
        dev = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True,
                             text=True, check=True).stdout.strip()
        attached.append(dev)
        return dev

    def detach(dev: str) -> None:
        subprocess.run(["losetup", "-d", dev], check=True)
        attached.remove(dev)

    yield attach, detach
    for dev in attached:
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if r.returncode:
            log.warning("detaching %s failed: %s", dev, r.stderr.strip())


def _listed(warehouse: str) -> list[str]:
    with open(os.path.join(warehouse, "dwfs.toml"), encoding="utf-8") as f:
        return [line.split('"')[1] for line in f if line.startswith("path = ")]


def _disks(tmp_path, attach, n: int) -> tuple[list, list[str]]:
    """`n` new 64 MiB disk files, each attached as a loop device: (files, devices)."""
    disks = []
    for i in range(n):
        disk = tmp_path / f"disk{i}"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        disks.append(disk)
    return disks, [attach(d) for d in disks]


def _mkfs(wh: str, level: str, devices: list[str]) -> None:
    dwfs("mkfs", wh, "--level", level, *[a for dev in devices for a in ("--device", dev)])


def test_disks_under_new_device_names_assemble_as_they_were(tmp_path, loops, fs_mount):
    attach, detach = loops
    disks, old = _disks(tmp_path, attach, 5)
    wh = str(tmp_path / "wh")
    _mkfs(wh, "raidz2", old)
    # Each disk is named by what it is, not only by its changing device name.
    assert [x["disk"] for x in status(wh)["members"]] == [f"loop device of {d}" for d in disks]
    m = fs_mount(wh)
    m.mount()
    blobs = {f"f{i}": os.urandom((i + 1) * 700_001) for i in range(3)}
    for name, blob in blobs.items():
        with open(m.path(name), "wb") as f:
            f.write(blob)
    m.umount()

    # The disks come back in another order, one of them under a name not listed at all.
    for dev in old:
        detach(dev)
    blocker = tmp_path / "blocker"
    with open(blocker, "wb") as f:
        f.truncate(1 << 20)
    attach(blocker)  # takes one of the old names
    new = {d: attach(d) for d in reversed(disks)}
    now = [new[d] for d in disks]  # slot order
    assert set(now) - set(old), "some disk must have a name the config does not list"

    r = dwfs("mount", wh, m.mountpoint)
    assert "member found at" in r.stderr and "dwfs.toml updated" in r.stderr, r.stderr
    doc = status(wh)
    assert doc["state"] == "clean"
    assert [x["path"] for x in doc["members"]] == now
    assert [x["disk"] for x in doc["members"]] == [f"loop device of {d}" for d in disks]
    for name, blob in blobs.items():
        with open(m.path(name), "rb") as f:
            assert f.read() == blob
    with open(m.path("after"), "wb") as f:  # writes go to the right disks
        f.write(b"x" * 3_000_000)
    # While mounted, the disks are claimed: they can be neither formatted nor mounted.
    r = subprocess.run(["mkfs.ext4", "-q", "-F", now[1]], capture_output=True, text=True)
    assert r.returncode != 0, r.stdout + r.stderr
    r = subprocess.run(["mount", now[3], str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0, r.stdout + r.stderr
    probe = subprocess.run(["blkid", "-p", now[1]], capture_output=True, text=True)
    assert "ext4" not in probe.stdout, probe.stdout  # (the scrub below checks every chunk)
    m.umount()
    assert _listed(wh) == now

    # With the config now right, the next mount says nothing of moves; a scrub is clean.
    r = dwfs("mount", wh, m.mountpoint)
    assert "member found" not in r.stderr, r.stderr
    scrub = dwfs("scrub", m.mountpoint)
    assert ": no errors" in scrub.stdout, scrub.stdout
    m.umount()


def test_a_disk_that_is_gone_leaves_the_array_degraded_and_named(tmp_path, loops, fs_mount):
    attach, detach = loops
    disks, devs = _disks(tmp_path, attach, 4)
    wh = str(tmp_path / "wh")
    _mkfs(wh, "raid5", devs)
    m = fs_mount(wh)
    m.mount()
    with open(m.path("f"), "wb") as f:
        f.write(b"y" * 1_000_000)
    m.umount()
    detach(devs[2])  # searched for on every disk, and not found
    r = dwfs("mount", wh, m.mountpoint)
    assert "degraded" in r.stderr and devs[2] in r.stderr, r.stderr
    gone = status(wh)["members"][2]
    assert gone["state"] == "missing" and "no disk behind it" in gone["reason"], gone
    assert gone["disk"] == f"loop device of {disks[2]}"  # which disk to look for
    shown = dwfs("status", wh).stdout
    assert "┃ disk " in shown and "loop device of" in shown, shown
    with open(m.path("f"), "rb") as f:
        assert f.read() == b"y" * 1_000_000
    m.umount()
    assert _listed(wh) == devs  # nothing moved: the config is left as it was


def test_a_failing_disk_is_rebuilt_onto_a_spare_disk(tmp_path, loops, fs_mount):
    attach, _ = loops
    disks, devs = _disks(tmp_path, attach, 6)
    wh = str(tmp_path / "wh")
    _mkfs(wh, "raid5", devs[:4])
    m = fs_mount(wh)
    m.mount()

    # A disk that holds a filesystem is a spare only when forced; a free one is taken as is.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "keep", devs[5]], check=True)
    r = dwfs("spare", "add", m.mountpoint, devs[5], check=False)
    assert r.returncode == 1 and "holds an ext4 filesystem labelled 'keep'" in r.stderr
    assert "[Errno" not in r.stderr, r.stderr
    dwfs("spare", "add", m.mountpoint, devs[4])
    assert status(wh)["spares"] == [devs[4]]

    blob = os.urandom(5_000_000)
    with open(m.path("f"), "wb") as f:
        f.write(blob)
    # Disk 1 fails: it shrinks to 1 MiB under the array, and writes past that fail.
    os.truncate(disks[1], 1 << 20)
    subprocess.run(["losetup", "-c", devs[1]], check=True)
    with open(m.path("g"), "wb") as f:
        f.write(os.urandom(3_000_000))
        f.flush()
        os.fsync(f.fileno())
    deadline = time.monotonic() + 120
    while True:
        doc = status(wh)
        if doc["state"] == "clean" and doc["members"][1]["path"] == devs[4]:
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.5)
    assert doc["spares"] == []
    assert doc["members"][1]["disk"] == f"loop device of {disks[4]}"
    subprocess.run(["sync"], check=True)
    with open(m.path("f"), "rb") as f:
        assert f.read() == blob
    m.umount()
    assert _listed(wh)[1] == devs[4]
    m.mount()
    assert status(wh)["state"] == "clean"
    m.umount()
