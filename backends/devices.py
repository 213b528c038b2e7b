"""The host's block devices, and the first bytes of one, read without opening it as a member:
where an array looks for members whose device names changed."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time

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


def identity(path: str) -> tuple[object, ...]:
    """What makes two paths the same member: the device number of a block device, else the
    file's device and inode (so symbolic and hard links match); the resolved path of one that
    cannot be seen (a member that is missing)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        log.debug("%s: %s", path, exc.strerror)
        return ("path", os.path.realpath(path))
    return ("disk", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


def size_of(path: str) -> int:
    """Bytes of the file or device at `path` (raises OSError if it cannot be opened)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def kind_problem(path: str) -> str | None:
    """Why `path` cannot hold a member (it is not a regular file or a block device), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((f"it is {name}, not a file or a disk" for test, name in kinds if test(mode)),
                "it is not a file or a disk")


def read_heads(paths: list[str], length: int, timeout: float) -> dict[str, bytes]:
    """The first `length` bytes of each of `paths` that can be read, all read at once; a
    device that has not answered within `timeout` seconds (a dying disk can hang a read) is
    left out and logged."""
    got: dict[str, bytes] = {}
    lock = threading.Lock()

    def probe(path: str) -> None:
        head = read_head(path, length)
        if head:
            with lock:
                got[path] = head

    threads = [threading.Thread(target=probe, args=(p,), name=f"probe {p}", daemon=True)
               for p in paths]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for p, t in zip(paths, threads, strict=True):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            log.warning("%s did not answer a read of its first %d bytes within %.0f s: "
                        "not looked at", p, length, timeout)
    with lock:
        return dict(got)


def read_head(path: str, length: int) -> bytes | None:
    """The first `length` bytes of the file or device at `path` (fewer if it is shorter), or
    None if it cannot be read; nothing is written and no lock is taken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("cannot open %s: %s", path, exc)
        return None
    try:
        return os.pread(fd, length, 0)
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
    finally:
        os.close(fd)


def describe(path: str, sys_block: str = SYS_BLOCK) -> str:
    """What the disk at `path` is, for telling disks apart by more than their changing names:
    model and serial number ("WDC WD40EFRX-68N32N0, serial WD-WCC7K1234567"), a partition of
    one, or the file behind a loop device; "" for anything that is not a block device."""
    if not is_block_device(path):
        return ""
    name = os.path.basename(os.path.realpath(path))
    node = os.path.realpath(os.path.join(sys_block, name))
    prefix = ""
    if os.path.exists(os.path.join(node, "partition")):
        prefix = f"partition {_sysfs(node, 'partition')} of "
        node = os.path.dirname(node)
    backing = _sysfs(node, "loop", "backing_file")
    if backing:
        return f"{prefix}loop device of {backing}"
    model = _sysfs(node, "device", "model")
    serial = (_sysfs(node, "device", "serial") or _sysfs(node, "serial")
              or _vpd_serial(os.path.join(node, "device", "vpd_pg80")))
    what = ", ".join(filter(None, (model, f"serial {serial}" if serial else "")))
    return f"{prefix}{what}" if what else ""


def _sysfs(*parts: str) -> str:
    """A sysfs attribute as text, stripped ("" if it is absent or unreadable: most exist for
    some kinds of disk only)."""
    raw = read_head(os.path.join(*parts), 4096) or b""
    return raw.decode(errors="replace").strip().strip("\0")


def _vpd_serial(path: str) -> str:
    """The unit serial number of a SCSI/SATA disk from its VPD page 0x80."""
    page = read_head(path, 4096) or b""  # (none: not a SCSI disk, or not offered)
    if len(page) < 4 or page[1] != 0x80:
        return ""
    length = int.from_bytes(page[2:4], "big")
    return page[4 : 4 + length].decode("ascii", errors="replace").strip()
