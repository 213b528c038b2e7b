"""The level table, `auto`, geometry and the CLI's mkfs output for each level."""

from __future__ import annotations

import os
import subprocess

import pytest
from mountutil import dwfs, status

from raid import levels
from raid.geometry import Geometry

MiB = 1 << 20

EXPECTED = {
    # level: (members, min members, tolerance, usable data columns per group, groups)
    "raid0": (3, 1, 0, 3, 1),
    "raid1": (3, 2, 2, 1, 1),
    "raid5": (4, 3, 1, 3, 1),
    "raid6": (6, 4, 2, 4, 1),
    "raid10": (4, 4, 1, 1, 2),
    "raid50": (6, 6, 1, 2, 2),
    "raid60": (8, 8, 2, 2, 2),
    "raidz1": (3, 2, 1, 2, 1),
    "raidz2": (5, 3, 2, 3, 1),
    "raidz3": (7, 4, 3, 4, 1),
}


@pytest.mark.parametrize("level", sorted(EXPECTED))
def test_table(level):
    members, minimum, tol, k, groups = EXPECTED[level]
    spec = levels.level_spec(level)
    assert spec.min_members == minimum
    assert levels.tolerance(level, members) == tol
    shape = levels.shape_of(level, members)
    assert (shape.k, shape.groups) == (k, groups)
    assert levels.usable_fraction(level, members) == pytest.approx(k * groups / members)
    with pytest.raises(levels.LevelError, match=f"{level} needs at least {minimum}"):
        levels.shape_of(level, minimum - 1)


@pytest.mark.parametrize("level", sorted(EXPECTED))
def test_capacity_matches_the_table(level):
    members = EXPECTED[level][0]
    g = Geometry.plan(level, members, 65536, 64 * MiB)
    assert g.capacity == pytest.approx(
        g.rows * g.chunk * levels.usable_fraction(level, members) * members, abs=1
    )
    assert g.member_bytes_needed <= 64 * MiB
    # Every row of every group places each column on a distinct member of that group.
    for row in range(min(g.rows, 50)):
        for group in range(g.groups):
            slots = g.column_slots(group, row)
            assert sorted(slots) == list(range(group * g.group_size, (group + 1) * g.group_size))


def test_odd_member_counts_are_refused():
    with pytest.raises(levels.LevelError, match="even number"):
        levels.shape_of("raid10", 5)
    with pytest.raises(levels.LevelError, match="two equal groups"):
        levels.shape_of("raid60", 9)
    with pytest.raises(levels.LevelError, match="unknown level 'raid7'"):
        levels.level_spec("raid7")


@pytest.mark.parametrize(
    "members,survive,level",
    [(2, 1, "raid1"), (3, 1, "raid5"), (8, 1, "raid5"), (3, 2, "raid1"), (6, 2, "raid6"),
     (6, 3, "raidz3"), (5, 4, "raid1"), (4, 0, "raid0")],
)
def test_auto(members, survive, level):
    choice = levels.choose_level(members, survive)
    assert choice.level == level
    assert levels.tolerance(level, members) >= survive
    assert choice.reason


def test_auto_refuses_the_impossible():
    with pytest.raises(levels.LevelError, match="needs at least 4 members"):
        levels.choose_level(3, 3)


def test_mkfs_auto_says_why(tmp_path):
    out = dwfs("mkfs", tmp_path / "wh", "--level", "auto", "--survive", "2", "--devices", 5,
               "--device-size", "8M").stdout
    assert "raid6" in out and "auto:" in out and "double parity" in out
    doc = status(tmp_path / "wh")
    assert doc["level"] == "raid6" and doc["tolerance"] == 2


def test_mkfs_survive_checks_an_explicit_level(tmp_path):
    p = dwfs("mkfs", tmp_path / "wh", "--level", "raid5", "--survive", "2", "--devices", 5,
             "--device-size", "8M", check=False)
    assert p.returncode == 1 and "survives 1 failed members, not 2" in p.stderr
    assert not (tmp_path / "wh").exists()


def test_mkfs_on_given_devices(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"disk{i}.img"
        p.write_bytes(b"")
        with open(p, "r+b") as f:
            f.truncate(16 * MiB)
        paths.append(p)
    args = []
    for p in paths:
        args += ["--device", p]
    dwfs("mkfs", tmp_path / "wh", "--level", "raidz1", *args)
    doc = status(tmp_path / "wh")
    assert [m["path"] for m in doc["members"]] == [str(p) for p in paths]
    assert doc["state"] == "clean"


def test_mkfs_refuses_devices_that_hold_something_unless_forced(tmp_path):
    # As zpool create and mdadm --create do: a filesystem, a partition table or a member of a
    # dwfs array (mounted or not) on a --device would be destroyed.
    paths = []
    for i in range(3):
        p = tmp_path / f"disk{i}.img"
        with open(p, "wb") as f:
            f.truncate(16 * MiB)
        paths.append(p)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "photos", str(paths[1])], check=True)
    dwfs("mkfs", tmp_path / "old", "--level", "raid1", "--device", paths[0], "--device",
         paths[2])
    before = [p.read_bytes() for p in paths]

    def mkfs(*extra):
        args = [a for p in paths for a in ("--device", p)]
        return dwfs("mkfs", tmp_path / "new", "--level", "raid5", *args, *extra, check=False)

    r = mkfs()
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"--device {paths[0]} holds slot 0 of dwfs array" in r.stderr
    assert "--force overwrites it" in r.stderr
    assert [p.read_bytes() for p in paths] == before  # nothing written
    assert not (tmp_path / "new").exists()
    assert status(tmp_path / "old")["state"] == "clean"

    for p in (paths[0], paths[2]):  # the old array's labels wiped: the ext4 is next
        with open(p, "r+b") as f:
            f.write(bytes(4096))
    r = mkfs()
    assert r.returncode == 1 and f"{paths[1]} holds an ext4 filesystem labelled 'photos'" in \
        r.stderr, r.stderr
    assert paths[1].read_bytes() == before[1]

    dwfs("mkfs", tmp_path / "new", "--level", "raid5", "--force",
         *[a for p in paths for a in ("--device", p)])
    assert status(tmp_path / "new")["state"] == "clean"


def test_mkfs_devices_that_cannot_be_members_and_members_of_different_sizes(tmp_path):
    paths = []
    for i, mib in enumerate((16, 16, 64)):
        p = tmp_path / f"disk{i}.img"
        with open(p, "wb") as f:
            f.truncate(mib * MiB)
        paths.append(p)
    (tmp_path / "dir").mkdir()
    for odd, what in (("/dev/null", "it is a character device"),
                      (tmp_path / "dir", "it is a directory")):
        r = dwfs("mkfs", tmp_path / "wh", "--level", "raid5", "--device", odd,
                 "--device", paths[0], "--device", paths[1], check=False)
        assert r.returncode == 1, r.stdout
        assert f"--device {odd} cannot be a member: {what}" in r.stderr, r.stderr
        assert not (tmp_path / "wh").exists()
    # The same file twice, through a link, would be two slots on one file.
    os.symlink(paths[0], tmp_path / "link")
    r = dwfs("mkfs", tmp_path / "wh", "--level", "raid5", "--device", paths[0],
             "--device", tmp_path / "link", "--device", paths[1], check=False)
    assert r.returncode == 1 and f"is the same as --device {paths[0]}" in r.stderr, r.stderr
    assert not (tmp_path / "wh").exists()
    # A larger member is used only up to the size of the smallest, and mkfs says so.
    r = dwfs("mkfs", tmp_path / "wh", "--level", "raid5",
             *[a for p in paths for a in ("--device", p)])
    unused = [line for line in r.stdout.splitlines() if "unused" in line]
    assert len(unused) == 1 and str(paths[2]) in unused[0], r.stdout
    assert "unused     48.2 MiB of" in unused[0], unused  # 64 MiB less the 15.8 MiB used
