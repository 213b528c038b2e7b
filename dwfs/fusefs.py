"""The FUSE adapter of the filesystem: translates pyfuse3 requests into vfs calls.

It decides nothing: every rule lives in `vfs.Filesystem`. Metadata requests run inline on the
trio thread when the filesystem's lock is free (SQLite answers in microseconds, a thread hop
costs more); requests that move file data, and any request that would wait for the lock, run
in one dedicated worker thread (in arrival order) so the event loop never blocks on the volume.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from dwfs.volumeworker import VolumeWorker
from vfs.attrs import STATE_XATTR, Attr, Caller, SetAttr
from vfs.view import View

log = logging.getLogger(__name__)

CACHE_SECONDS = 300.0
# Attributes are cached briefly: a reply carrying attributes taken before a concurrent setattr
# (rsync's generator lists while its receiver sets symlink times) must not stick for minutes.
ATTR_SECONDS = 1.0
SLOW_THREADS = 16  # requests waiting for ghosts' sources at once
QUIET_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.ENOTDIR,
                errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.EPERM, errno.EXDEV,
                errno.EOPNOTSUPP, errno.ERANGE, errno.ENOSPC, errno.EFBIG, errno.E2BIG,
                errno.EMLINK, errno.ELOOP}


def fuse_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Answer OSErrors from lower layers with their errno; log the unexpected ones. Any other
    exception is a bug: it is logged with its traceback and answered with EIO."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code in QUIET_ERRNOS:
                log.debug("%s%r: %s", func.__name__, args[1:], exc)
            else:
                log.error("%s%r failed: %s", func.__name__, args[1:], exc)
            raise pyfuse3.FUSEError(code) from exc
        except Exception as exc:  # noqa: BLE001 - a bug in one request must not end the mount
            log.exception("%s%r: unexpected error; answering EIO", func.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


def entry(a: Attr, entry_timeout: float = CACHE_SECONDS) -> pyfuse3.EntryAttributes:
    """pyfuse3 attributes of a vfs Attr; names from a query are not cached (timeout 0)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_size = a.size
    e.st_rdev = a.rdev
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    e.st_blocks = a.blocks
    e.st_blksize = a.blksize
    e.entry_timeout = entry_timeout
    e.attr_timeout = ATTR_SECONDS
    return e


def caller(ctx: pyfuse3.RequestContext, mode: int = 0) -> Caller:
    """The requesting process; its supplementary groups only when setgid rules need them."""
    groups: tuple[int, ...] = ()
    if mode & stat.S_ISGID and ctx.uid != 0:
        try:
            groups = tuple(pyfuse3.get_sup_groups(ctx.pid))
        except OSError as exc:
            log.info("groups of pid %d unknown (%s); using its primary group only", ctx.pid, exc)
    return Caller(ctx.uid, ctx.gid, groups)


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 operations over the vfs View of a filesystem."""

    enable_writeback_cache = False  # write errors (ENOSPC) must reach the writer at write()

    def __init__(self, fs: View) -> None:
        super().__init__()
        self.fs = fs
        self.worker = VolumeWorker("fs-worker")
        self.slow_limiter = trio.CapacityLimiter(SLOW_THREADS)

    async def _meta(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a metadata call inline if the lock is free, else in a worker thread."""
        if self.fs.lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                self.fs.lock.release()
        return await self.worker.run(fn, *args)

    async def _slow(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a call that may wait for a ghost's source in a thread of its own, so neither
        the event loop nor the volume worker waits with it."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.slow_limiter)

    async def _data(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a call that may touch the volume in the worker thread."""
        return await self.worker.run(fn, *args)

    def sync(self) -> None:
        """Make everything durable (control socket `flush`, SIGHUP)."""
        self.fs.commit()

    # --- names and attributes -----------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        attr = await self._meta(self.fs.find, parent_inode, name)
        timeout = 0.0 if self.fs.volatile(parent_inode) else CACHE_SECONDS
        if attr is not None:
            self.fs.remember(attr)
            return entry(attr, timeout)
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0  # a negative entry the kernel may cache
        neg.entry_timeout = timeout if await self._meta(self.fs.keeps_names, parent_inode) else 0
        return neg

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return entry(await self._meta(self.fs.getattr, inode))

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        ch = SetAttr(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        if ch.size is not None and self.fs.is_ghost(inode):
            return entry(await self._slow(self.fs.setattr, inode, ch))
        run = self._data if ch.size is not None else self._meta
        return entry(await run(self.fs.setattr, inode, ch))

    @fuse_errors
    async def readlink(self, inode, ctx):
        return await self._meta(self.fs.readlink, inode)

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return entry(await self._meta(self.fs.mknod, parent_inode, name, mode, rdev,
                                      caller(ctx, mode)))

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        attr = await self._meta(self.fs.mkdir, parent_inode, name, mode, caller(ctx))
        self.fs.remember(attr)
        return entry(attr)

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return entry(await self._meta(self.fs.symlink, parent_inode, name, target, caller(ctx)))

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return entry(await self._meta(self.fs.link, inode, new_parent_inode, new_name))

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._meta(self.fs.unlink, parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._meta(self.fs.rmdir, parent_inode, name)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._meta(self.fs.rename, parent_inode_old, name_old, parent_inode_new,
                         name_new, flags)

    # --- files --------------------------------------------------------------------------------

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        a = await self._meta(self.fs.create, parent_inode, name, mode, flags, caller(ctx, mode))
        return pyfuse3.FileInfo(fh=a.ino, keep_cache=True), entry(a)

    @fuse_errors
    async def open(self, inode, flags, ctx):
        await self._data(self.fs.open, inode, flags)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_errors
    async def read(self, fh, off, size):
        if self.fs.needs_fetch(fh):
            held = self.fs.read_held(fh, off, size)  # no thread hop when it is at hand
            return held if held is not None else await self._slow(self.fs.read, fh, off, size)
        if size < 65536:  # a small read costs less than the hop to the worker and back
            return await self._meta(self.fs.read, fh, off, size)
        return await self._data(self.fs.read, fh, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        if self.fs.is_ghost(fh):
            return await self._slow(self.fs.write, fh, off, buf)
        if len(buf) < 65536:
            return await self._meta(self.fs.write, fh, off, buf)
        return await self._data(self.fs.write, fh, off, buf)

    async def flush(self, fh):
        # Nothing to do at close(): writes report their errors themselves (no writeback
        # cache) and fsync makes data durable. ENOSYS makes the kernel stop sending FLUSH,
        # which saves a round trip on every close(); close() then returns 0, as now.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def fsync(self, fh, datasync):
        await self._data(self.fs.commit)

    @fuse_errors
    async def release(self, fh):
        await self._meta(self.fs.release, fh)

    # --- directories --------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        return await self._meta(self.fs.opendir, inode)

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        cookie = start_id
        timeout = 0.0 if self.fs.volatile_handle(fh) else CACHE_SECONDS
        while True:
            batch = await self._meta(self.fs.readdir, fh, cookie)
            if not batch:
                return
            for e in batch:
                if not pyfuse3.readdir_reply(token, e.name, entry(e.attr, timeout),
                                             e.next_cookie):
                    return
                if e.name not in (b".", b".."):  # the kernel counts these as lookups
                    self.fs.remember(e.attr)
                cookie = e.next_cookie

    @fuse_errors
    async def releasedir(self, fh):
        await self._meta(self.fs.releasedir, fh)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        await self._data(self.fs.commit)

    # --- extended attributes ------------------------------------------------------------------

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        if name == STATE_XATTR:  # may fetch or hash a whole ghost
            await self._slow(self.fs.setxattr, inode, name, value)
            return
        await self._meta(self.fs.setxattr, inode, name, value)

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        if self.fs.has_no_capability(name):  # asked before every write: answered at once
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._meta(self.fs.getxattr, inode, name)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        return await self._meta(self.fs.listxattr, inode)

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        await self._meta(self.fs.removexattr, inode, name)

    # --- whole filesystem ---------------------------------------------------------------------

    @fuse_errors
    async def statfs(self, ctx):
        d = await self._meta(self.fs.statfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = d["bsize"]
        s.f_frsize = d["frsize"]
        s.f_blocks = d["blocks"]
        s.f_bfree = d["bfree"]
        s.f_bavail = d["bavail"]
        s.f_files = d["files"]
        s.f_ffree = d["ffree"]
        s.f_favail = d["ffree"]
        s.f_namemax = d["namemax"]
        return s

    async def forget(self, inode_list):
        try:
            await self._meta(self.fs.forget, list(inode_list))
        except OSError as exc:  # forget has no reply: log and go on
            log.error("forget of %d inodes failed: %s", len(inode_list), exc)
