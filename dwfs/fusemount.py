"""Opening a FUSE connection at a mount point, and taking it down.

Root mounts with mount(2) on a /dev/fuse descriptor it opens itself; anyone else asks the setuid
`fusermount3` to do it and receives the descriptor over a socket, as libfuse does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys

from dwfs.fuseabi import DEV_IOC_CLONE

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 16, 128, 1024, 2048
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# Options that are mount(2) flags: (flags set, flags cleared).
FLAG_OPTIONS = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY), "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV), "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS), "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "nodiratime": (MS_NODIRATIME, 0),
    "strictatime": (MS_STRICTATIME, 0), "relatime": (0, 0),
}
# Options the kernel's FUSE driver itself reads from the mount data.
KERNEL_OPTIONS = {"default_permissions", "allow_other"}

_libc = ctypes.CDLL(None, use_errno=True)


class MountFailed(OSError):
    """The kernel or fusermount3 refused the mount."""


def mount(mountpoint: str, fsname: str, subtype: str, options: set[str]) -> int:
    """Mount a FUSE filesystem at `mountpoint`; the connection's /dev/fuse descriptor."""
    if os.getuid() == 0:
        return _mount_as_root(mountpoint, fsname, subtype, options)
    return _mount_with_fusermount(mountpoint, fsname, subtype, options)


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: open files keep it until they close)."""
    if os.getuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):  # already gone
            return
        raise MountFailed(code, f"umount2 of {mountpoint}: {os.strerror(code)}")
    tool = shutil.which("fusermount3") or "fusermount3"
    done = subprocess.run([tool, "-u", "-q", "-z", "--", mountpoint], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        log.warning("fusermount3 -uz %s: %s", mountpoint, done.stderr.strip())


def clone_nonblocking(fd: int) -> int | None:
    """A second, non-blocking descriptor on the FUSE connection of `fd` (requests can be read
    from either; a reply goes to the descriptor its request came from), or None if the kernel
    refuses one."""
    try:
        new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.info("cannot open /dev/fuse for a second descriptor (%s): requests are read by "
                 "blocking only", exc)
        return None
    try:
        fcntl.ioctl(new, DEV_IOC_CLONE, fd.to_bytes(4, sys.byteorder))
    except OSError as exc:
        os.close(new)
        log.info("cannot clone the FUSE descriptor (%s): requests are read by blocking only",
                 exc)
        return None
    return new


def abort(device: str | None) -> None:
    """End the FUSE connection of a mount's device ("major:minor") through fusectl, if the
    connection is still there (files open on a lazily detached mount keep it)."""
    if device is None:
        return
    path = f"/sys/fs/fuse/connections/{device.split(':')[1]}/abort"
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write("1")
    except FileNotFoundError:
        return  # the connection is gone already (or fusectl is not mounted)
    except OSError as exc:
        log.warning("cannot abort FUSE connection %s (%s): %s; it ends when the last file "
                    "open on it is closed", device, path, exc)


def _mount_as_root(mountpoint: str, fsname: str, subtype: str, options: set[str]) -> int:
    flags = MS_NOSUID | MS_NODEV  # as libfuse: set-uid files and devices only when asked for
    for opt in sorted(options):
        if opt in FLAG_OPTIONS:
            on, off = FLAG_OPTIONS[opt]
            flags = (flags | on) & ~off
        elif opt not in KERNEL_OPTIONS:
            raise MountFailed(errno.EINVAL, f"unknown FUSE mount option {opt!r}")
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    root_mode = stat.S_IFMT(os.stat(mountpoint).st_mode)
    data = [f"fd={fd}", f"rootmode={root_mode:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}"] + sorted(options & KERNEL_OPTIONS)
    if _libc.mount(os.fsencode(fsname), os.fsencode(mountpoint), f"fuse.{subtype}".encode(),
                   ctypes.c_ulong(flags), ",".join(data).encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise MountFailed(code, f"mount of {mountpoint}: {os.strerror(code)}")
    return fd


def _mount_with_fusermount(mountpoint: str, fsname: str, subtype: str,
                           options: set[str]) -> int:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise MountFailed(errno.ENOENT, "fusermount3 is not installed (apt-get install fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        opts = ",".join(sorted(options) + [f"fsname={fsname}", f"subtype={subtype}"])
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([tool, "-o", opts, "--", mountpoint], env=env,
                                pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True)
        theirs.close()
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        _, err = proc.communicate()
    if not fds:
        raise MountFailed(errno.EIO, f"fusermount3 could not mount {mountpoint}: "
                                     f"{err.strip() or 'no descriptor received'}")
    os.set_inheritable(fds[0], False)
    return fds[0]
