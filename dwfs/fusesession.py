"""A FUSE session: reads the kernel's requests from /dev/fuse, hands them to handlers, and
carries replies and cache invalidations back.

One thread reads and parses every request; a handler answers it on that thread or passes it to
another (see `dwfs.fusehandlers`), and whichever thread finishes writes the reply. Replies and
notifications are single writes to the device, which the kernel takes whole from any thread.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from dwfs import fuseabi as abi
from dwfs.fusemount import abort, clone_nonblocking, mount, unmount
from dwfs.mounts import mount_device
from vfs.attrs import SetAttr

if TYPE_CHECKING:
    from dwfs.fusehandlers import Handlers

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
BUFFER = MAX_WRITE + 64 * 1024  # a whole write request with its headers, or a 64 KiB xattr
WANTED = (abi.ASYNC_READ | abi.ATOMIC_O_TRUNC | abi.EXPORT_SUPPORT | abi.BIG_WRITES
          | abi.DO_READDIRPLUS | abi.ASYNC_DIO | abi.MAX_PAGES | abi.HANDLE_KILLPRIV_V2)
_BYTES = (bytes, bytearray)
# How long the reading thread polls for the next request before it sleeps (only while requests
# come in quick succession): about one round trip of a small request.
SPIN_NS = 50_000
# How far the kernel reads ahead of a sequential reader (FUSE mounts start at 128 KiB; 4 MiB
# or more read slower here, with more requests waiting on the one worker).
READAHEAD_KB = 1024
GONE = (errno.ENODEV, errno.EBADF)  # the connection ended: unmounted or aborted


class Request:
    """One request being answered: who asked, and how to answer."""

    __slots__ = ("fd", "unique", "uid", "gid", "pid", "umask")  # umask: set by creating requests

    def __init__(self, fd: int, unique: int, uid: int, gid: int, pid: int) -> None:
        self.fd = fd
        self.unique = unique
        self.uid = uid
        self.gid = gid
        self.pid = pid

    def reply(self, payload: Any = b"") -> None:
        """Answer with success and `payload` (bytes or any buffer)."""
        n = len(payload) if isinstance(payload, _BYTES) else memoryview(payload).nbytes
        head = abi.OUT_HEADER.pack(16 + n, 0, self.unique)
        _write(self.fd, [head, payload] if n else [head], self.unique)

    def fail(self, code: int) -> None:
        """Answer with an errno."""
        _write(self.fd, [abi.OUT_HEADER.pack(16, -code, self.unique)], self.unique)


def _write(fd: int, parts: list, unique: int) -> None:
    try:
        os.writev(fd, parts)
    except OSError as exc:
        # ENOENT: the request was interrupted and is gone; GONE: unmounted meanwhile.
        if exc.errno not in (errno.ENOENT, *GONE):
            log.error("reply to FUSE request %d failed: %s", unique, exc)


class Session:
    """A mounted FUSE connection served by `handlers`."""

    def __init__(self, handlers: Handlers, mountpoint: str, fsname: str,
                 options: set[str]) -> None:
        self.handlers = handlers
        self.mountpoint = mountpoint
        self.fd = mount(mountpoint, fsname, "dwfs", options)
        self.device = mount_device(mountpoint)  # "major:minor", to end the connection by
        self._poll_fd = clone_nonblocking(self.fd)  # polled for requests in quick succession
        self._mounted = True
        self._table = self._parsers()

    # --- serving ------------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until the filesystem is unmounted or `terminate` is called."""
        buf = bytearray(BUFFER)
        view, bufs = memoryview(buf), [buf]
        table, header, clock = self._table, abi.IN_HEADER, time.perf_counter_ns
        poll_fd = self._poll_fd
        spin = poll_fd is not None
        while True:
            start = clock()
            n = -1
            try:
                if spin:
                    # Requests that follow one another closely (a program that stats, unlinks
                    # or creates in a loop) are taken without this thread going to sleep: a
                    # sleeping reader costs the kernel a wake-up on every request.
                    fd, deadline = poll_fd, start + SPIN_NS
                    while n < 0:
                        try:
                            n = os.readv(fd, bufs)
                        except BlockingIOError:
                            if clock() > deadline:
                                break
                if n < 0:
                    fd = self.fd
                    n = os.readv(fd, bufs)
                    # Poll before the next request only if polling would have caught this one.
                    spin = poll_fd is not None and clock() - start < 2 * SPIN_NS
            except OSError as exc:
                if exc.errno in GONE:
                    log.info("FUSE connection of %s ended", self.mountpoint)
                    return
                if exc.errno in (errno.EINTR, errno.ENOENT):  # interrupted before we read it
                    continue
                raise
            _, op, unique, node, uid, gid, pid, _, _ = header.unpack_from(buf)
            r = Request(fd, unique, uid, gid, pid)
            parse = table.get(op)
            if parse is None:
                if op not in (abi.INTERRUPT,):
                    r.fail(errno.ENOSYS)
                continue
            try:
                parse(r, node, view[40:n])
            except Exception:  # noqa: BLE001 - a bad request must not end the mount
                log.exception("FUSE request %d (opcode %d, node %d) failed", unique, op, node)
                r.fail(errno.EIO)
            if op == abi.DESTROY:
                return

    def terminate(self) -> None:
        """Unmount and end the connection, so `serve` returns; files still open on the mount
        then see it gone (ENOTCONN)."""
        self.unmount()
        abort(self.device)

    def unmount(self) -> None:
        """Detach the mount, once."""
        if self._mounted:
            self._mounted = False
            unmount(self.mountpoint)

    def close(self) -> None:
        """Close the connection's descriptors (which aborts it if still mounted)."""
        if self._poll_fd is not None:
            os.close(self._poll_fd)
        os.close(self.fd)

    # --- notifications ------------------------------------------------------------------------

    def invalidate_inode(self, ino: int) -> None:
        """Make the kernel drop its cached attributes and data of `ino`."""
        self._notify(abi.NOTIFY_INVAL_INODE, abi.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0))

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget the name `name` in directory `parent`."""
        self._notify(abi.NOTIFY_INVAL_ENTRY,
                     abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0")

    def _notify(self, code: int, body: bytes) -> None:
        try:
            os.write(self.fd, abi.OUT_HEADER.pack(16 + len(body), code, 0) + body)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel had nothing cached
                raise

    def _raise_readahead(self) -> None:
        """Let the kernel read ahead READAHEAD_KB at a time (needs root).

        Done once INIT is answered (the kernel sets the mount's readahead from that reply, and
        lowers, never raises, its own) and before the next request is read: a file keeps the
        readahead it found when it was opened, and the first file opened after a mount was
        read 128 KiB at a time, about a tenth as fast."""
        if self.device is None:
            log.info("no mountinfo entry for %s; readahead unchanged", self.mountpoint)
            return
        path = f"/sys/class/bdi/{self.device}/read_ahead_kb"
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(f"{READAHEAD_KB}\n")
        except OSError as exc:
            log.info("cannot raise readahead of %s (%s): %s", self.mountpoint, path, exc)

    # --- parsing: one function per opcode -----------------------------------------------------

    def _parsers(self) -> dict[int, Any]:
        h = self.handlers

        def name_of(body: memoryview) -> bytes:
            return bytes(body[:-1])

        def init(r: Request, node: int, body: memoryview) -> None:
            major, minor, readahead, flags = abi.INIT_IN.unpack_from(body)
            if major != abi.KERNEL_MAJOR or minor < abi.OLDEST_KERNEL_MINOR:
                log.error("kernel speaks FUSE %d.%d; dwfs needs %d.%d", major, minor,
                          abi.KERNEL_MAJOR, abi.OLDEST_KERNEL_MINOR)
                r.fail(errno.EPROTO)
                return
            r.reply(abi.INIT_OUT.pack(abi.KERNEL_MAJOR, abi.KERNEL_MINOR, readahead,
                                      flags & (WANTED | h.init_flags), 0, 0, MAX_WRITE, 1,
                                      MAX_WRITE // 4096, 0, 0, 0))
            self._raise_readahead()

        def destroy(r: Request, node: int, body: memoryview) -> None:
            r.reply()

        def forget(r: Request, node: int, body: memoryview) -> None:
            h.forget([(node, abi.FORGET_IN.unpack_from(body)[0])])

        def batch_forget(r: Request, node: int, body: memoryview) -> None:
            count = abi.BATCH_FORGET_IN.unpack_from(body)[0]
            h.forget([abi.FORGET_ONE.unpack_from(body, 8 + 16 * i) for i in range(count)])

        def setattr_(r: Request, node: int, body: memoryview) -> None:
            (valid, _, _, size, _, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
             _, uid, gid, _) = abi.SETATTR_IN.unpack_from(body)
            now = time.time_ns() if valid & (abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW) else 0
            ch = SetAttr(
                mode=mode if valid & abi.FATTR_MODE else None,
                uid=uid if valid & abi.FATTR_UID else None,
                gid=gid if valid & abi.FATTR_GID else None,
                size=size if valid & abi.FATTR_SIZE else None,
                atime_ns=(now if valid & abi.FATTR_ATIME_NOW else
                          atime * abi.NSEC + atimensec if valid & abi.FATTR_ATIME else None),
                mtime_ns=(now if valid & abi.FATTR_MTIME_NOW else
                          mtime * abi.NSEC + mtimensec if valid & abi.FATTR_MTIME else None),
                ctime_ns=ctime * abi.NSEC + ctimensec if valid & abi.FATTR_CTIME else None,
                kill_setid=bool(valid & abi.FATTR_KILL_SUIDGID),
                times_set=bool(valid & abi.FATTR_ATIME and not valid & abi.FATTR_ATIME_NOW
                               or valid & abi.FATTR_MTIME and not valid & abi.FATTR_MTIME_NOW),
            )
            h.setattr(r, node, ch)

        def symlink(r: Request, node: int, body: memoryview) -> None:
            name, target = abi.split_names(bytes(body), 2)
            h.symlink(r, node, name, target)

        def mknod(r: Request, node: int, body: memoryview) -> None:
            mode, rdev, r.umask, _ = abi.MKNOD_IN.unpack_from(body)
            h.mknod(r, node, name_of(body[16:]), mode, rdev)

        def mkdir(r: Request, node: int, body: memoryview) -> None:
            mode, r.umask = abi.MKDIR_IN.unpack_from(body)
            h.mkdir(r, node, name_of(body[8:]), (mode & 0o7777) | 0o040000)

        def rename(r: Request, node: int, body: memoryview) -> None:
            newdir = abi.RENAME_IN.unpack_from(body)[0]
            old, new = abi.split_names(bytes(body[8:]), 2)
            h.rename(r, node, old, newdir, new, 0)

        def rename2(r: Request, node: int, body: memoryview) -> None:
            newdir, flags, _ = abi.RENAME2_IN.unpack_from(body)
            old, new = abi.split_names(bytes(body[16:]), 2)
            h.rename(r, node, old, newdir, new, flags)

        def link(r: Request, node: int, body: memoryview) -> None:
            h.link(r, abi.LINK_IN.unpack_from(body)[0], node, name_of(body[8:]))

        def open_(r: Request, node: int, body: memoryview) -> None:
            flags, open_flags = abi.OPEN_IN.unpack_from(body)
            h.open(r, node, flags, bool(open_flags & abi.OPEN_KILL_SUIDGID))

        def read(r: Request, node: int, body: memoryview) -> None:
            fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(body)
            h.read(r, fh, offset, size)

        def write(r: Request, node: int, body: memoryview) -> None:
            fh, offset, size, write_flags, _, _, _ = abi.WRITE_IN.unpack_from(body)
            h.write(r, fh, offset, bytes(body[40:40 + size]),
                    bool(write_flags & abi.WRITE_KILL_SUIDGID))

        def release(r: Request, node: int, body: memoryview) -> None:
            h.release(r, abi.RELEASE_IN.unpack_from(body)[0])

        def releasedir(r: Request, node: int, body: memoryview) -> None:
            h.releasedir(r, abi.RELEASE_IN.unpack_from(body)[0])

        def fsync(r: Request, node: int, body: memoryview) -> None:
            fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
            h.fsync(r, fh, bool(flags & 1))

        def fsyncdir(r: Request, node: int, body: memoryview) -> None:
            fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
            h.fsyncdir(r, fh, bool(flags & 1))

        def fallocate(r: Request, node: int, body: memoryview) -> None:
            fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(body)
            h.fallocate(r, fh, mode, offset, length)

        def lseek(r: Request, node: int, body: memoryview) -> None:
            fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(body)
            h.lseek(r, fh, offset, whence)

        def setxattr(r: Request, node: int, body: memoryview) -> None:
            size, flags = abi.SETXATTR_IN.unpack_from(body)
            rest = bytes(body[8:])
            name, _, value = rest.partition(b"\0")
            h.setxattr(r, node, name, value[:size], flags)

        def getxattr(r: Request, node: int, body: memoryview) -> None:
            size, _ = abi.GETXATTR_IN.unpack_from(body)
            h.getxattr(r, node, name_of(body[8:]), size)

        def listxattr(r: Request, node: int, body: memoryview) -> None:
            h.listxattr(r, node, abi.GETXATTR_IN.unpack_from(body)[0])

        def opendir(r: Request, node: int, body: memoryview) -> None:
            h.opendir(r, node)

        def readdir(r: Request, node: int, body: memoryview) -> None:
            fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(body)
            h.readdir(r, fh, offset, size, False)

        def readdirplus(r: Request, node: int, body: memoryview) -> None:
            fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(body)
            h.readdir(r, fh, offset, size, True)

        def create(r: Request, node: int, body: memoryview) -> None:
            # (its open_flags: a file just made has no setid bits to clear)
            flags, mode, r.umask, _ = abi.CREATE_IN.unpack_from(body)
            h.create(r, node, name_of(body[16:]), mode, flags)

        def copy_file_range(wide: bool) -> Any:
            def parse(r: Request, node: int, body: memoryview) -> None:
                fh_in, off_in, _, fh_out, off_out, length, flags = \
                    abi.COPY_FILE_RANGE_IN.unpack_from(body)
                h.copy_file_range(r, fh_in, off_in, fh_out, off_out, length, flags, wide)
            return parse

        def tmpfile(r: Request, node: int, body: memoryview) -> None:
            flags, mode, r.umask, _ = abi.CREATE_IN.unpack_from(body)
            h.tmpfile(r, node, mode, flags)

        def ioctl(r: Request, node: int, body: memoryview) -> None:
            _, _, cmd, _, in_size, out_size = abi.IOCTL_IN.unpack_from(body)
            start = abi.IOCTL_IN.size
            h.ioctl(r, node, cmd, bytes(body[start:start + in_size]), out_size)

        def by_name(method: Any) -> Any:
            return lambda r, node, body: method(r, node, name_of(body))

        def by_node(method: Any) -> Any:
            return lambda r, node, body: method(r, node)

        return {
            abi.INIT: init, abi.DESTROY: destroy, abi.FORGET: forget,
            abi.BATCH_FORGET: batch_forget, abi.LOOKUP: by_name(h.lookup),
            abi.GETATTR: by_node(h.getattr), abi.STATX: by_node(h.statx), abi.SETATTR: setattr_,
            abi.READLINK: by_node(h.readlink), abi.SYMLINK: symlink, abi.MKNOD: mknod,
            abi.MKDIR: mkdir, abi.UNLINK: by_name(h.unlink), abi.RMDIR: by_name(h.rmdir),
            abi.RENAME: rename, abi.RENAME2: rename2, abi.LINK: link, abi.OPEN: open_,
            abi.READ: read, abi.WRITE: write, abi.STATFS: by_node(h.statfs),
            abi.RELEASE: release, abi.FSYNC: fsync, abi.SETXATTR: setxattr,
            abi.GETXATTR: getxattr, abi.LISTXATTR: listxattr,
            abi.REMOVEXATTR: by_name(h.removexattr), abi.FLUSH: by_node(h.flush),
            abi.OPENDIR: opendir, abi.READDIR: readdir, abi.READDIRPLUS: readdirplus,
            abi.RELEASEDIR: releasedir, abi.FSYNCDIR: fsyncdir, abi.CREATE: create,
            abi.FALLOCATE: fallocate, abi.LSEEK: lseek, abi.TMPFILE: tmpfile, abi.IOCTL: ioctl,
            abi.COPY_FILE_RANGE: copy_file_range(False),
            abi.COPY_FILE_RANGE_64: copy_file_range(True),
        }
