"""The host's block devices, and the first bytes of one, read without opening it as a member:
where an array looks for members whose device names changed."""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/class/block"
# Kinds of device that never hold a member: RAM disks, compressed swap, optical drives (whose
# reads can wait for a disc).
_SKIPPED = ("ram", "zram", "sr", "fd")


def block_devices(sys_block: str = SYS_BLOCK) -> list[str]:
    """Paths of the host's block devices and partitions (`/dev/NAME` for every entry of
    /sys/class/block that has one), in name order."""
    try:
        names = sorted(os.listdir(sys_block))
    except OSError as exc:
        log.warning("cannot list block devices in %s: %s", sys_block, exc)
        return []
    found = []
    for name in names:
        if name.startswith(_SKIPPED):
            continue
        path = os.path.join("/dev", name)
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                found.append(path)
        except OSError as exc:
            log.debug("block device %s has no usable node %s: %s", name, path, exc)
    return found


def is_block_device(path: str) -> bool:
    """True if `path` is (or links to) a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError as exc:  # a missing member: not a device, as far as anyone can tell
        log.debug("%s: %s", path, exc)
        return False


def read_head(path: str, length: int) -> bytes | None:
    """The first `length` bytes of the file or device at `path` (fewer if it is shorter), or
    None if it cannot be read; nothing is written and no lock is taken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("cannot open %s to read its label: %s", path, exc)
        return None
    try:
        return os.pread(fd, length, 0)
    except OSError as exc:
        log.debug("cannot read the label of %s: %s", path, exc)
        return None
    finally:
        os.close(fd)
