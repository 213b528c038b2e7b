"""The warehouse's own disk and files under a mount. The disk fills up (other programs write to
it too): new files and attributes get ENOSPC before the metadata database could not be
written, nothing already made is lost, `df -i` shows no free inodes meanwhile, and the room
comes back with the disk's. The metadata database is removed while mounted: changes get EIO,
nothing committed is lost, and fsck restores the database from the copy on the volume."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from mountutil import FsMount, dwfs, make_warehouse, status

from vfs.metadb import ROOM_RECHECK

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root only)")

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """A 320 MiB tmpfs: the warehouse's own disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320M", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@ROOT_ONLY
def test_a_full_disk_under_the_warehouse_gives_enospc_and_loses_nothing(small_disk, tmp_path):
    m = FsMount(make_warehouse(small_disk / "wh", size="32M"), tmp_path / "mnt")
    filler = small_disk / "filler"
    try:
        m.mount()
        # Another program takes the disk but for 100 MiB (less than the database keeps
        # free, with what an open transaction adds to it, once it grows a little).
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, _free(small_disk) - 100 * MiB)
        made, code = [], None
        for i in range(100_000):
            p = m.path(f"f{i:06d}")
            try:
                with open(p, "x"):
                    pass
                os.setxattr(p, "user.big", b"x" * 3000)
            except OSError as exc:
                code = exc.errno
                break
            made.append(p)
        assert code == errno.ENOSPC and len(made) > 100
        assert os.statvfs(m.mountpoint).f_ffree == 0  # df -i: no free inodes
        assert "MiB free" in status(m.warehouse)["metadata_room"]  # dwfs status says why
        assert _free(small_disk) > 16 * MiB  # stopped well before the disk was full
        os.unlink(filler)  # the disk has room again: so do new files, at once
        with open(m.path("after"), "x") as f:
            f.write("written")
        os.setxattr(m.path("after"), "user.big", b"x" * 3000)
        assert os.statvfs(m.mountpoint).f_ffree > 0
        assert status(m.warehouse)["metadata_room"] is None
        m.umount()
        m.mount()
        names = set(os.listdir(m.mountpoint))
        assert {os.path.basename(p) for p in made} | {"after"} <= names
        assert os.getxattr(m.path(os.path.basename(made[-1])), "user.big") == b"x" * 3000
        m.umount()
        assert "clean" in dwfs("fsck", m.warehouse).stdout
    finally:
        m.cleanup()


def test_a_metadata_database_removed_while_mounted_is_restored_by_fsck(tmp_path):
    m = FsMount(make_warehouse(tmp_path / "wh"), tmp_path / "mnt")
    try:
        m.mount()
        with open(m.path("a"), "w") as f:
            f.write("committed")
            f.flush()
            os.fsync(f.fileno())
        for suffix in ("", "-wal", "-shm"):
            os.unlink(os.path.join(m.warehouse, "meta.db" + suffix))
        time.sleep(2 * ROOM_RECHECK)  # the database's file and disk are looked at this often
        with pytest.raises(OSError) as exc:
            open(m.path("b"), "x").close()
        assert exc.value.errno == errno.EIO
        with open(m.path("a")) as f:
            assert f.read() == "committed"
        dwfs("umount", m.mountpoint)  # writes the metadata copy from the open database
        refused = dwfs("mount", m.warehouse, m.mountpoint, check=False)
        assert refused.returncode != 0 and "fsck --repair" in refused.stderr
        assert "restored the metadata" in dwfs("fsck", "--repair", m.warehouse,
                                               check=False).stdout
        m.mount()
        assert os.listdir(m.mountpoint) == ["a"]
        with open(m.path("a")) as f:
            assert f.read() == "committed"
        m.umount()
        assert "clean" in dwfs("fsck", m.warehouse).stdout
        with open(os.path.join(m.warehouse, "dwfs.log")) as f:
            assert "was removed while the filesystem is mounted" in f.read()
    finally:
        m.cleanup()
