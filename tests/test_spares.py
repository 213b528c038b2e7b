"""Spares: member files made ahead, which the mount daemon rebuilds a failed member onto by
itself, as md does with a spare disk."""

from __future__ import annotations

import os
import time

import pytest
from mountutil import FsMount, drop_caches, dwfs, force_unmount, make_warehouse, status

from dwfs.config import ConfigError, load_config


def test_spares_are_made_listed_and_taken_off(tmp_path):
    wh = make_warehouse(tmp_path / "wh", size="32M")
    spare = str(tmp_path / "spare.img")
    done = dwfs("spare", "add", wh, spare)
    assert f"spare {spare} added" in done.stdout
    member_size = os.path.getsize(load_config(wh).member_path(0))
    assert os.path.getsize(spare) == member_size
    assert os.stat(spare).st_blocks * 512 >= member_size  # its space is reserved
    assert status(wh)["spares"] == [spare] and load_config(wh).spares == [spare]
    assert f"spares     {spare}" in dwfs("status", wh).stdout
    # Refused, changing nothing: the same path again, a member, a file that exists.
    taken = tmp_path / "taken.img"
    taken.write_bytes(b"someone's data")
    for path, message in ((spare, "is already a member or a spare"),
                          (load_config(wh).member_path(1), "is already a member or a spare"),
                          (str(taken), "exists; a spare file is made new"),
                          (str(tmp_path / "no" / "dir.img"), "is not a directory")):
        r = dwfs("spare", "add", wh, path, check=False)
        assert r.returncode == 1 and message in r.stderr, r.stderr
    assert taken.read_bytes() == b"someone's data"
    assert load_config(wh).spares == [spare]
    r = dwfs("spare", "rm", wh, str(taken), check=False)
    assert r.returncode == 1 and "is not a spare" in r.stderr
    done = dwfs("spare", "rm", wh, spare)
    assert "removed (the disk or file stays as it is); spares: none" in done.stdout
    assert os.path.exists(spare) and load_config(wh).spares == []


def test_a_spare_that_is_also_a_member_is_a_config_error(tmp_path):
    wh = make_warehouse(tmp_path / "wh", size="16M")
    with open(os.path.join(wh, "dwfs.toml"), "a", encoding="utf-8") as f:
        f.write('\n[[spares]]\npath = "members/member-2.img"\n')
    with pytest.raises(ConfigError, match="spare members/member-2.img is also listed as a member"):
        load_config(wh)


@pytest.mark.timeout(180)
def test_a_failed_member_is_rebuilt_onto_a_spare_while_mounted(tmp_path):
    wh = make_warehouse(tmp_path / "wh", size="32M")
    m = FsMount(wh, tmp_path / "mnt")
    spares = [str(tmp_path / "spare1.img"), str(tmp_path / "spare2.img")]
    try:
        m.mount()
        for spare in spares:  # through the daemon, by its mount point
            dwfs("spare", "add", m.mountpoint, spare)
        files = {m.path(f"f{i}"): os.urandom(1 + i * 900_000) for i in range(8)}
        for path, data in files.items():
            with open(path, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        victim = load_config(wh).member_path(3)
        os.unlink(victim)
        deadline = time.monotonic() + 60
        while True:
            doc = status(wh)
            if doc["state"] == "clean" and doc["members"][3]["path"] == spares[0]:
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.2)
        assert doc["spares"] == [spares[1]]
        with open(os.path.join(wh, "dwfs.log"), errors="replace") as f:
            log = f.read()
        assert f"notify spare-used: slot 3 was rebuilt onto spare {spares[0]}" in log
        drop_caches()
        for path, data in files.items():
            with open(path, "rb") as f:
                assert f.read() == data, path
        m.umount()
        cfg = load_config(wh)  # the daemon wrote both changes down
        assert cfg.member_path(3) == spares[0] and cfg.spares == [spares[1]]
        fsck = dwfs("fsck", wh, "--verify-data")
        assert "clean" in fsck.stdout
        m.mount()
        assert status(wh)["state"] == "clean"
        m.umount()
    finally:
        force_unmount(m.mountpoint, wh)
