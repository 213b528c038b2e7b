"""Reading /proc/mounts and calling fusermount3."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger(__name__)


class MountEntry(NamedTuple):
    """One line of /proc/mounts."""

    source: str
    mountpoint: str
    fstype: str


def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mounts() -> list[MountEntry]:
    """Every current mount."""
    with open("/proc/mounts", encoding="utf-8") as f:
        rows = [line.split() for line in f]
    return [MountEntry(_unescape(r[0]), _unescape(r[1]), r[2]) for r in rows if len(r) >= 3]


def dwfs_mounts() -> list[MountEntry]:
    """Every dwfs mount (its source is the warehouse)."""
    return [m for m in mounts() if m.fstype == "fuse.dwfs"]


def canonical(mountpoint: str) -> str:
    """The path the kernel shows for a mount point, without touching the mount point itself.

    Resolving the mount point itself would send a request to its FUSE daemon, which may be the
    caller, or hung.
    """
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def find_mount(mountpoint: str) -> MountEntry | None:
    """The mount at `mountpoint`, if any (the last one, as the kernel shows it)."""
    target = canonical(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found


def is_mounted(mountpoint: str) -> bool:
    return find_mount(mountpoint) is not None


def fusermount_unmount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    """Run `fusermount3 -u` (or `-uz`) on a mount point."""
    import shutil  # here: the commands that only read /proc/mounts start without it
    import subprocess

    tool = shutil.which("fusermount3") or "fusermount3"
    args = [tool, "-uz" if lazy else "-u", mountpoint]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def mount_device(mountpoint: str) -> str | None:
    """The "major:minor" of the mount at `mountpoint`, from /proc/self/mountinfo."""
    target = canonical(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
    return found
