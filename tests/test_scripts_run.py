"""scripts/run: creates and mounts the default warehouse; explains a warehouse without meta.db."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from mountutil import dwfs, force_unmount, is_mounted, make_warehouse

from dwfs.config import load_config
from dwfs.warehouse import open_volume
from vfs.filedata import BLOCK

RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "run")

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="scripts/setup links helpers as root")


def _run(wh, mp, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DWFS_WAREHOUSE=str(wh), DWFS_MOUNT=str(mp), DWFS_DEVICES="3",
               DWFS_DEVICE_SIZE="32M")
    return subprocess.run([RUN, *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


@pytest.fixture
def place(tmp_path):
    wh, mp = tmp_path / "data" / "wh", tmp_path / "mnt"
    yield wh, mp
    force_unmount(mp, wh)


def test_creates_and_mounts_the_filesystem(place):
    wh, mp = place
    p = _run(wh, mp)
    assert p.returncode == 0, p.stderr
    assert "creating the default warehouse" in p.stdout
    assert "(auto:" in p.stdout
    assert f"the filesystem is mounted at {mp}" in p.stdout
    assert is_mounted(mp)
    (mp / "f").write_text("x")
    p = _run(wh, mp)
    assert p.returncode == 0 and "already mounted" in p.stdout
    dwfs("umount", mp)
    p = _run(wh, mp, "--raw")
    assert p.returncode == 0, p.stderr
    assert f"the raw volume is {mp}/volume" in p.stdout
    assert "holds a dwfs filesystem: its raw volume is mounted read-only" in p.stderr
    assert os.path.getsize(mp / "volume") > 0
    with pytest.raises(OSError) as exc:
        os.open(mp / "volume", os.O_WRONLY)
    assert exc.value.errno == errno.EROFS


def test_raw_creates_a_warehouse_of_the_raw_volume_only(place):
    """`scripts/run --raw` with no warehouse yet makes one without a filesystem: its raw
    volume is writable; the filesystem mount then says what the warehouse holds."""
    wh, mp = place
    p = _run(wh, mp, "--raw")
    assert p.returncode == 0, p.stderr
    assert "creating the default warehouse" in p.stdout and "read-only" not in p.stderr
    assert not (wh / "meta.db").exists()
    blob = os.urandom(1 << 20)
    fd = os.open(mp / "volume", os.O_WRONLY)
    try:
        os.pwrite(fd, blob, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    dwfs("umount", mp)
    p = _run(wh, mp)
    assert p.returncode == 1 and "holds a raw volume, not a filesystem" in p.stderr
    assert not is_mounted(mp)
    p = _run(wh, mp, "--raw")
    assert p.returncode == 0, p.stderr
    with open(mp / "volume", "rb") as f:
        assert f.read(len(blob)) == blob


def test_warehouse_of_an_earlier_version(place):
    """Raw volume only: no meta.db and no metadata copy. Nothing is changed; --raw still works."""
    wh, mp = place
    make_warehouse(wh, level="raid5", devices=3, size="32M")
    v = open_volume(load_config(str(wh)))
    v.write(0, os.urandom(2 * BLOCK))  # raw-volume data where the superblocks would be
    v.close()
    os.unlink(wh / "meta.db")
    before = (wh / "dwfs.toml").read_text()
    p = _run(wh, mp)
    assert p.returncode == 1
    assert "holds a raw volume, not a filesystem" in p.stderr and "scripts/run --raw" in p.stderr
    assert f"mv {wh} {wh}.raw" in p.stderr
    assert not is_mounted(mp)
    assert (wh / "dwfs.toml").read_text() == before and not (wh / "meta.db").exists()
    p = _run(wh, mp, "--raw")
    assert p.returncode == 0, p.stderr
    assert is_mounted(mp)


def test_lost_meta_db_points_to_fsck_repair(place):
    wh, mp = place
    make_warehouse(wh, level="raid5", devices=3, size="32M")
    os.unlink(wh / "meta.db")
    p = _run(wh, mp)
    assert p.returncode == 1
    assert f"fsck --repair {wh}" in p.stderr and "holds a copy" in p.stderr
    assert not is_mounted(mp) and not (wh / "meta.db").exists()
