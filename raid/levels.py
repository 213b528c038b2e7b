"""The one table of RAID levels: minimum members, tolerance, usable capacity, and `auto`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raid import codec


class LevelError(ValueError):
    """An unknown level, or a member count the level cannot use."""


@dataclass(frozen=True)
class LevelSpec:
    """What a level is made of: groups of `group_size` members, each k data + m parity."""

    name: str
    min_members: int
    parity: int  # members per group that may fail (tolerance)
    code: str  # "none", "mirror", "md", "zfs"
    summary: str

    def groups(self, members: int) -> int:
        """How many redundancy groups `members` members form."""
        if self.name == "raid10":
            return members // 2
        if self.name in ("raid50", "raid60"):
            return 2
        return 1

    def check(self, members: int) -> None:
        """Raise LevelError if this level cannot be built from `members` members."""
        if members < self.min_members:
            raise LevelError(
                f"{self.name} needs at least {self.min_members} members, got {members}"
            )
        if self.name == "raid10" and members % 2:
            raise LevelError(f"raid10 needs an even number of members, got {members}")
        if self.name in ("raid50", "raid60") and members % 2:
            raise LevelError(
                f"{self.name} stripes over two equal groups: needs an even member count, "
                f"got {members}"
            )


LEVELS: dict[str, LevelSpec] = {
    s.name: s
    for s in [
        LevelSpec("raid0", 1, 0, "none", "striping, no redundancy"),
        LevelSpec("raid1", 2, -1, "mirror", "n-way mirror: survives all but one member"),
        LevelSpec("raid5", 3, 1, "md", "striping with rotating XOR parity (Linux md layout)"),
        LevelSpec("raid6", 4, 2, "md", "striping with P+Q parity (Linux md layout)"),
        LevelSpec("raid10", 4, 1, "mirror", "stripes over mirrored pairs"),
        LevelSpec("raid50", 6, 1, "md", "stripes over two raid5 groups"),
        LevelSpec("raid60", 8, 2, "md", "stripes over two raid6 groups"),
        LevelSpec("raidz1", 2, 1, "zfs", "ZFS-style single parity"),
        LevelSpec("raidz2", 3, 2, "zfs", "ZFS-style double parity"),
        LevelSpec("raidz3", 4, 3, "zfs", "ZFS-style triple parity"),
    ]
}


def level_spec(name: str) -> LevelSpec:
    """The spec of a named level, or a LevelError listing the known ones."""
    try:
        return LEVELS[name]
    except KeyError:
        known = ", ".join([*LEVELS, "auto"])
        raise LevelError(f"unknown level {name!r}; known levels: {known}") from None


@dataclass(frozen=True)
class Shape:
    """The code of one group: k data columns, m parity columns, group size k + m."""

    k: int
    m: int
    groups: int

    @property
    def group_size(self) -> int:
        return self.k + self.m


def shape_of(level: str, members: int) -> Shape:
    """k, m and group count of `level` on `members` members."""
    spec = level_spec(level)
    spec.check(members)
    groups = spec.groups(members)
    size = members // groups
    if spec.code == "none":
        return Shape(size, 0, groups)
    if spec.code == "mirror":
        return Shape(1, size - 1, groups)
    return Shape(size - spec.parity, spec.parity, groups)


def tolerance(level: str, members: int) -> int:
    """How many members may fail, whichever they are, with no data lost."""
    return shape_of(level, members).m


def usable_fraction(level: str, members: int) -> float:
    """Usable share of the raw capacity."""
    s = shape_of(level, members)
    return s.k / s.group_size


def parity_matrix(level: str, members: int) -> np.ndarray:
    """The parity rows of one group's code."""
    spec = level_spec(level)
    s = shape_of(level, members)
    if spec.code == "none":
        return np.zeros((0, s.k), dtype=np.uint8)
    if spec.code == "mirror":
        return codec.mirror_matrix(s.group_size)
    if spec.code == "md":
        return codec.md_pq_matrix(s.k, s.m)
    return codec.zfs_matrix(s.k, s.m)


@dataclass(frozen=True)
class AutoChoice:
    """The level `auto` picked, and why."""

    level: str
    reason: str


def choose_level(members: int, survive: int = 1) -> AutoChoice:
    """Pick a level for `members` members that survives `survive` failed members.

    Prefers the most usable capacity; among equals, the layout with the simplest recovery.
    """
    if survive < 0:
        raise LevelError(f"--survive must be 0 or more, got {survive}")
    if survive == 0:
        return AutoChoice("raid0", f"no redundancy asked for: striping over {members} members")
    if members < survive + 1:
        raise LevelError(
            f"surviving {survive} failed members needs at least {survive + 1} members, "
            f"got {members}"
        )
    if members == survive + 1:
        return AutoChoice(
            "raid1",
            f"{members} members surviving {survive} failures: only an {members}-way mirror can",
        )
    if survive == 1:
        return AutoChoice(
            "raid5",
            f"{members} members, 1 failure: single parity keeps {members - 1}/{members} "
            "of the space",
        )
    if survive == 2:
        return AutoChoice(
            "raid6",
            f"{members} members, 2 failures: double parity keeps {members - 2}/{members} "
            "of the space",
        )
    if survive == 3:
        return AutoChoice(
            "raidz3",
            f"{members} members, 3 failures: triple parity keeps {members - 3}/{members} "
            "of the space",
        )
    return AutoChoice(
        "raid1",
        f"surviving {survive} failures on {members} members: beyond triple parity only a "
        f"{members}-way mirror survives {members - 1}",
    )
