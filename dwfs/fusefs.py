"""The FUSE adapter of the filesystem: answers the kernel's requests with vfs calls.

It decides nothing: every rule lives in `vfs`. Which thread answers is decided by the lanes of
`dwfs.fusehandlers`; what the reply looks like by `dwfs.fuseabi`.
"""

from __future__ import annotations

import errno
import logging
import stat

from dwfs import fuseabi as abi
from dwfs.fusehandlers import Handlers
from dwfs.fusesession import Request
from vfs.acl import NAMES as ACL_NAMES
from vfs.attrs import Attr, Caller, SetAttr
from vfs.inodeflags import from_xflags, to_xflags
from vfs.view import View
from vfs.xattrnames import STATE_XATTR

log = logging.getLogger(__name__)

CACHE_SECONDS = 300.0
# Attributes are cached briefly: a reply carrying attributes taken before a concurrent setattr
# (rsync's generator lists while its receiver sets symlink times) must not stick for minutes.
ATTR_SECONDS = 1.0
SMALL_IO = 65536  # reads and writes below this cost less inline than the hop to the worker
DOTS = (b".", b"..")


def entry(a: Attr) -> bytes:
    """The reply to a request that made or found a name."""
    return abi.pack_entry(a, CACHE_SECONDS, ATTR_SECONDS)


def attr_out(a: Attr) -> bytes:
    """The reply to getattr and setattr."""
    return abi.pack_attr_out(a, ATTR_SECONDS)


def created(a: Attr) -> bytes:
    """The reply to create and tmpfile: the new file's entry and its open handle."""
    return entry(a) + open_out(a.ino)


def open_out(fh: int, keep_cache: bool = True) -> bytes:
    """The reply to open and opendir."""
    return abi.OPEN_OUT.pack(fh, abi.FOPEN_KEEP_CACHE if keep_cache else 0, 0)


def sized(value: bytes, size: int) -> bytes:
    """An xattr value or name list as getxattr/listxattr answer a buffer of `size` bytes."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, f"{len(value)} bytes do not fit in {size}")
    return value


def caller(r: Request, mode: int = 0) -> Caller:
    """The requesting process (with the umask a creating request carries); its supplementary
    groups only when setgid rules need them."""
    groups: tuple[int, ...] = ()
    if mode & stat.S_ISGID and r.uid != 0:
        try:
            groups = _sup_groups(r.pid)
        except OSError as exc:
            log.info("groups of pid %d unknown (%s); using its primary group only", r.pid, exc)
    return Caller(r.uid, r.gid, groups, getattr(r, "umask", None))


def _sup_groups(pid: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Groups:"):
                return tuple(int(g) for g in line.split()[1:])
    return ()


class FuseOperations(Handlers):
    """FUSE requests answered by the vfs View of a filesystem."""

    # The kernel checks POSIX ACLs (system.posix_acl_* attributes); creating requests carry
    # the umask, which vfs applies unless the directory has a default ACL.
    init_flags = abi.POSIX_ACL | abi.DONT_MASK

    def __init__(self, fs: View) -> None:
        super().__init__(fs.lock, "fs-worker")
        self.fs = fs

    def sync(self) -> None:
        """Make everything durable (control socket `flush`, SIGHUP)."""
        self.fs.commit()

    # --- names and attributes -----------------------------------------------------------------

    def lookup(self, r: Request, parent: int, name: bytes) -> None:
        self.meta(r, None, self._lookup, parent, name)

    def _lookup(self, parent: int, name: bytes) -> bytes:
        attr = self.fs.find(parent, name)
        timeout = 0.0 if self.fs.volatile(parent) else CACHE_SECONDS
        if attr is not None:
            self.fs.remember(attr)
            return abi.pack_entry(attr, timeout, ATTR_SECONDS)
        # A negative entry the kernel may cache, where names cannot appear behind its back.
        return abi.pack_negative_entry(timeout if self.fs.keeps_names(parent) else 0.0)

    def _entry(self, attr: Attr) -> bytes:
        """The reply that gives the kernel an entry (a reference it will forget)."""
        self.fs.remember(attr)
        return entry(attr)

    def _created(self, attr: Attr) -> bytes:
        """The reply to create and tmpfile (an entry, and an open handle)."""
        self.fs.remember(attr)
        return created(attr)

    def getattr(self, r: Request, node: int) -> None:
        self.meta(r, attr_out, self.fs.getattr, node)

    def statx(self, r: Request, node: int) -> None:
        """statx(2) for what getattr lacks: the attributes with the birth time."""
        self.meta(r, lambda ab: abi.pack_statx_out(*ab, ATTR_SECONDS), self.fs.statx, node)

    def setattr(self, r: Request, node: int, ch: SetAttr) -> None:
        if ch.size is None:
            self.meta(r, attr_out, self.fs.setattr, node, ch)
        elif self.fs.is_ghost(node):
            self.slow(r, attr_out, self.fs.setattr, node, ch)
        else:
            self.data(r, attr_out, self.fs.setattr, node, ch)

    def readlink(self, r: Request, node: int) -> None:
        self.meta(r, None, self.fs.readlink, node)

    def mknod(self, r: Request, parent: int, name: bytes, mode: int, rdev: int) -> None:
        self.meta(r, self._entry, self.fs.mknod, parent, name, mode, rdev, caller(r, mode))

    def mkdir(self, r: Request, parent: int, name: bytes, mode: int) -> None:
        self.meta(r, None, self._mkdir, parent, name, mode, caller(r))

    def _mkdir(self, parent: int, name: bytes, mode: int, who: Caller) -> bytes:
        return self._entry(self.fs.mkdir(parent, name, mode, who))

    def symlink(self, r: Request, parent: int, name: bytes, target: bytes) -> None:
        self.meta(r, self._entry, self.fs.symlink, parent, name, target, caller(r))

    def link(self, r: Request, node: int, parent: int, name: bytes) -> None:
        self.meta(r, self._entry, self.fs.link, node, parent, name)

    def unlink(self, r: Request, parent: int, name: bytes) -> None:
        self.meta(r, None, self.fs.unlink, parent, name)

    def rmdir(self, r: Request, parent: int, name: bytes) -> None:
        self.meta(r, None, self.fs.rmdir, parent, name)

    def rename(self, r: Request, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int) -> None:
        self.meta(r, None, self.fs.rename, parent, name, new_parent, new_name, flags, caller(r))

    # --- files --------------------------------------------------------------------------------

    def create(self, r: Request, parent: int, name: bytes, mode: int, flags: int) -> None:
        self.meta(r, self._created, self.fs.create, parent, name, mode, flags, caller(r, mode))

    def tmpfile(self, r: Request, parent: int, mode: int, flags: int) -> None:
        self.meta(r, self._created, self.fs.tmpfile, parent, mode, flags, caller(r, mode))

    def open(self, r: Request, node: int, flags: int, kill_setid: bool = False) -> None:
        # The kernel reads cached pages without telling the filesystem, so a file whose
        # atime a read would update is opened without its cached pages: its first read comes
        # here (and updates atime as relatime does); once atime is current the cache is kept.
        self.data(r, lambda a: open_out(node, keep_cache=not self.fs.atime_due(a)),
                  self.fs.open, node, flags, kill_setid)

    def read(self, r: Request, fh: int, offset: int, size: int) -> None:
        if self.fs.needs_fetch(fh):
            held = self.fs.read_held(fh, offset, size)  # no thread hop when it is at hand
            if held is not None:
                r.reply(held)
            else:
                self.slow(r, None, self.fs.read, fh, offset, size)
        elif size < SMALL_IO:
            self.meta(r, None, self.fs.read, fh, offset, size)
        else:
            self.data(r, None, self.fs.read, fh, offset, size)

    def write(self, r: Request, fh: int, offset: int, data: bytes,
              kill_setid: bool = False) -> None:
        if self.fs.is_ghost(fh):
            self.slow(r, _written, self.fs.write, fh, offset, data, kill_setid)
        elif len(data) < SMALL_IO:
            self.meta(r, _written, self.fs.write, fh, offset, data, kill_setid)
        else:
            self.data(r, _written, self.fs.write, fh, offset, data, kill_setid)

    def fallocate(self, r: Request, fh: int, mode: int, offset: int, length: int) -> None:
        lane = self.slow if self.fs.is_ghost(fh) else self.data
        lane(r, None, self.fs.fallocate, fh, mode, offset, length)

    def copy_file_range(self, r: Request, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int, wide: bool) -> None:
        if flags:
            r.fail(errno.EINVAL)
            return
        pack = abi.COPY_FILE_RANGE_OUT.pack if wide else _written
        ghosts = self.fs.is_ghost(fh_in) or self.fs.is_ghost(fh_out)
        lane = self.slow if ghosts else self.data
        lane(r, pack, self.fs.copy_range, fh_in, off_in, fh_out, off_out, length)

    def ioctl(self, r: Request, node: int, cmd: int, data: bytes, out_size: int) -> None:
        """chattr's flags (FS_IOC_GETFLAGS and SETFLAGS, FS_IOC_FSGETXATTR and FSSETXATTR);
        ENOTTY for any other ioctl, as for a file that has none."""
        def out(payload: bytes) -> bytes:
            return abi.IOCTL_OUT.pack(0, 0, 0, 0) + payload[:out_size]

        if cmd in (abi.FS_IOC_GETFLAGS, abi.FS_IOC32_GETFLAGS):
            self.meta(r, lambda flags: out(flags.to_bytes(4, "little")), self.fs.get_flags, node)
        elif cmd in (abi.FS_IOC_SETFLAGS, abi.FS_IOC32_SETFLAGS) and len(data) >= 4:
            flags = int.from_bytes(data[:4], "little")
            self.meta(r, lambda _: out(b""), self.fs.set_flags, node, flags)
        elif cmd == abi.FS_IOC_FSGETXATTR:
            self.meta(r, lambda flags: out(abi.FSXATTR.pack(to_xflags(flags), 0, 0, 0, 0)),
                      self.fs.get_flags, node)
        elif cmd == abi.FS_IOC_FSSETXATTR and len(data) >= abi.FSXATTR.size:
            xflags, extsize, _, projid, cowextsize = abi.FSXATTR.unpack_from(data)
            if extsize or projid or cowextsize:
                r.fail(errno.EOPNOTSUPP)  # no extent size hints or project quotas here
                return
            self.meta(r, lambda _: out(b""), self._set_xflags, node, xflags)
        else:
            r.fail(errno.ENOTTY)

    def _set_xflags(self, node: int, xflags: int) -> None:
        self.fs.set_flags(node, from_xflags(xflags))

    def lseek(self, r: Request, fh: int, offset: int, whence: int) -> None:
        self.meta(r, abi.LSEEK_OUT.pack, self.fs.seek, fh, offset, whence)

    def flush(self, r: Request, node: int) -> None:
        # Nothing to do at close(): writes report their errors themselves (no writeback
        # cache) and fsync makes data durable. ENOSYS makes the kernel stop sending FLUSH,
        # which saves a round trip on every close(); close() then returns 0, as now.
        r.fail(errno.ENOSYS)

    def fsync(self, r: Request, fh: int, datasync: bool) -> None:
        # Little data goes into the intent log, committed with the metadata; such a commit
        # runs like a metadata request (inline when the lock is free: no thread hop; an 8 KiB
        # write and fdatasync took 354-364 µs instead of 400-425), a larger one, which
        # flushes the volume, in the worker, so the session goes on reading requests.
        lane = self.meta if self.fs.small_commit() else self.data
        lane(r, None, self.fs.commit, False, True)

    def release(self, r: Request, fh: int) -> None:
        self.meta(r, None, self.fs.release, fh)

    # --- directories --------------------------------------------------------------------------

    def opendir(self, r: Request, node: int) -> None:
        self.meta(r, lambda fh: open_out(fh, keep_cache=False), self.fs.opendir, node)

    def readdir(self, r: Request, fh: int, offset: int, size: int, plus: bool) -> None:
        self.meta(r, None, self._readdir, fh, offset, size, plus)

    def _readdir(self, fh: int, cookie: int, size: int, plus: bool) -> bytes:
        """As many entries from `cookie` on as fit in `size` bytes; with `plus`, each with its
        attributes, which the kernel counts as a lookup."""
        timeout = 0.0 if self.fs.volatile_handle(fh) else CACHE_SECONDS
        out: list[bytes] = []
        used = 0
        while True:
            batch = self.fs.readdir(fh, cookie)
            if not batch:
                return b"".join(out)
            for e in batch:
                a = e.attr
                item = abi.pack_dirent(a.ino, e.next_cookie, e.name, a.mode)
                if plus:
                    item = abi.pack_entry(a, timeout, ATTR_SECONDS) + item
                if used + len(item) > size:
                    return b"".join(out)
                out.append(item)
                used += len(item)
                if plus and e.name not in DOTS:
                    self.fs.remember(a)
                cookie = e.next_cookie

    def releasedir(self, r: Request, fh: int) -> None:
        self.meta(r, None, self.fs.releasedir, fh)

    def fsyncdir(self, r: Request, fh: int, datasync: bool) -> None:
        self.fsync(r, fh, datasync)

    # --- extended attributes ------------------------------------------------------------------

    def setxattr(self, r: Request, node: int, name: bytes, value: bytes, flags: int) -> None:
        if name == STATE_XATTR:  # may fetch or hash a whole ghost
            self.slow(r, None, self.fs.setxattr, node, name, value)
        elif name in ACL_NAMES:  # setgid follows the setter's groups
            self.meta(r, None, self.fs.setxattr, node, name, value, flags,
                      caller(r, stat.S_ISGID))
        else:
            self.meta(r, None, self.fs.setxattr, node, name, value, flags)

    def getxattr(self, r: Request, node: int, name: bytes, size: int) -> None:
        if self.fs.has_no_capability(name):  # asked before every write: answered at once
            r.fail(errno.ENODATA)
        else:
            self.meta(r, lambda v: sized(v, size), self.fs.getxattr, node, name)

    def listxattr(self, r: Request, node: int, size: int) -> None:
        self.meta(r, lambda names: sized(b"".join(n + b"\0" for n in names), size),
                  self.fs.listxattr, node)

    def removexattr(self, r: Request, node: int, name: bytes) -> None:
        self.meta(r, None, self.fs.removexattr, node, name)

    # --- whole filesystem ---------------------------------------------------------------------

    def statfs(self, r: Request, node: int) -> None:
        self.meta(r, _kstatfs, self.fs.statfs)

    def forget(self, items: list[tuple[int, int]]) -> None:
        # Counted at once, without the lock: a write short of space may be waiting for it.
        released = self.fs.drop_refs(items)
        if released:
            self.unanswered(self._free_forgotten, released)

    def _free_forgotten(self, inos: list[int]) -> None:
        try:
            self.fs.free_forgotten(inos)
        except OSError as exc:  # forget has no reply: log and go on
            log.error("freeing %d removed inodes the kernel forgot failed (%s...): %s",
                      len(inos), inos[:5], exc)


def _written(n: int) -> bytes:
    return abi.WRITE_OUT.pack(n, 0)


def _kstatfs(d: dict[str, int]) -> bytes:
    return abi.KSTATFS.pack(d["blocks"], d["bfree"], d["bavail"], d["files"], d["ffree"],
                            d["bsize"], d["namemax"], d["frsize"], 0)
